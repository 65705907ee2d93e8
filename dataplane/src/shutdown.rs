//! Stopping on SIGINT/SIGTERM: the commands finish their work (flush,
//! report, exit 0) instead of dying mid-write.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// A flag that becomes true on SIGINT or SIGTERM.
pub fn on_signal() -> std::io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    Ok(stop)
}
