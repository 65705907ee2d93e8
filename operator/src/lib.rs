//! The ZeroDrop operator: reconciles `StreamPipeline` objects into data-plane
//! StatefulSets, Services, ConfigMaps and PodDisruptionBudgets.

pub mod collect;
pub mod control;
pub mod controller;
pub mod desired;
pub mod drift;
pub mod handover;
pub mod metrics;
pub mod promsource;
pub mod scrape;
