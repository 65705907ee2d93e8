//! End-to-end test support lives in tests/.
