//! The ZeroDrop operator: reconciles `StreamPipeline` objects into data-plane
//! StatefulSets, Services, ConfigMaps and PodDisruptionBudgets.

pub mod controller;
pub mod desired;
pub mod metrics;
