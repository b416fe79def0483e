//! Logging: `tracing` events for process start and exit, and `log_to_stderr`, whose level every
//! child adopts.

use std::sync::OnceLock;

use tracing::Level;

static LEVEL: OnceLock<Level> = OnceLock::new();

/// Prints multiproc's `tracing` events (and every other event at `level` or above) to stderr,
/// in this process and in every child it starts from now on.
///
/// Like Python's `multiprocessing.log_to_stderr`. If the program already installed a global
/// `tracing` subscriber, that one stays in charge here, and children still adopt `level`.
pub fn log_to_stderr(level: Level) {
    let _ = LEVEL.set(level);
    install(level);
}

/// The level children should adopt, if logging was turned on in this process.
pub(crate) fn inherited_level() -> Option<String> {
    LEVEL.get().map(|level| level.to_string())
}

/// Adopts the parent's level in a child (a no-op where a subscriber already exists, as in a
/// forked child that inherited its parent's).
pub(crate) fn adopt(level: Option<&str>) {
    if let Some(level) = level.and_then(|l| l.parse::<Level>().ok()) {
        let _ = LEVEL.set(level);
        install(level);
    }
}

fn install(level: Level) {
    let _ = tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).try_init();
}
