//! The progress bar of a long map (the `progress` feature): items done, rate and time left,
//! on stderr, drawn only when stderr is a terminal (indicatif hides it otherwise).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar for `len` items (a spinner with a count when the length is not known).
pub(crate) fn bar(len: Option<usize>) -> ProgressBar {
    match len {
        Some(len) => {
            let bar = ProgressBar::new(len as u64);
            let style =
                ProgressStyle::with_template("{bar:40} {pos}/{len} items, {per_sec}, {eta} left");
            if let Ok(style) = style {
                bar.set_style(style);
            }
            bar
        }
        None => {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {pos} items, {per_sec}") {
                bar.set_style(style);
            }
            bar
        }
    }
}
