//! The operating-system boundary: every `unsafe` block and every Linux-specific call of multiproc.
//!
//! Most calls go through rustix, which makes the raw syscalls with its safety kept upstream;
//! what rustix lacks (`recvmsg` into uninitialised memory, `fork`, `posix_spawn`, signal
//! dispositions) is called through libc here (ARCHITECTURE.md, "The OS boundary").
//!
//! The rest of the workspace denies `unsafe_code`; this module allows it per file, and each block
//! carries a `// SAFETY:` line with its proof. Keeping the platform here (pidfd, SCM_RIGHTS,
//! `/proc`, `posix_spawn`, `.init_array`) is what lets a macOS backend follow later by adding a
//! sibling file instead of touching the process code.

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux;

#[cfg(target_os = "linux")]
pub use linux::*;

#[allow(unsafe_code)]
mod same_type;

pub use same_type::{as_slice, vec_as};

#[cfg(not(target_os = "linux"))]
compile_error!("multiproc supports Linux only for now; see ARCHITECTURE.md, section `sys`");

use std::io;
use std::time::Instant;

/// Runs `f` again for as long as it fails with `EINTR`.
///
/// Every blocking call in this module goes through here, so a signal delivered to the calling
/// thread (a profiler's SIGPROF, a terminal's SIGWINCH) never surfaces as a spurious error.
pub fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Milliseconds left until `deadline` for `poll(2)`, rounded up; `-1` (wait forever) for `None`.
pub fn poll_timeout_ms(deadline: Option<Instant>) -> i32 {
    match deadline {
        None => -1,
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            // Round up so that a wait never returns a hair before its deadline and spins.
            let ms = left.as_micros().div_ceil(1000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_count_sees_a_new_thread() {
        // The test harness starts and ends threads of its own for the tests that run beside
        // this one; a try counts only when no such thread came or went across it.
        let mut seen = Vec::new();
        for _ in 0..100 {
            let before = thread_count().unwrap();
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || rx.recv().ok());
            let during = thread_count().unwrap();
            drop(tx);
            thread.join().unwrap();
            let after = thread_count().unwrap();
            if before == after && during == before + 1 {
                return;
            }
            seen.push((before, during, after));
        }
        panic!("never counted exactly one more thread: (before, during, after) = {seen:?}");
    }

    #[test]
    fn vec_from_bytes_copies_every_element_from_unaligned_bytes() {
        // Past the prefault threshold, and one byte off alignment.
        let values: Vec<u64> = (0..(3 << 20) / 8).map(|i| i * 0x9e37_79b9).collect();
        let mut bytes = vec![0u8; 1];
        bytes.extend_from_slice(bytemuck::cast_slice(&values));
        assert_eq!(vec_from_bytes::<u64>(&bytes[1..]), values);
        assert_eq!(vec_from_bytes::<u16>(&[1, 0, 2, 0]), [1, 2]);
        assert!(vec_from_bytes::<u32>(&[]).is_empty());
    }

    #[test]
    fn cpu_affinity_can_be_narrowed_and_restored() {
        let all = cpu_affinity().unwrap();
        assert!(!all.is_empty());
        // On a thread of its own, so that no other test runs pinned.
        std::thread::spawn(move || {
            set_cpu_affinity(&all[..1]).unwrap();
            assert_eq!(cpu_affinity().unwrap(), all[..1]);
            set_cpu_affinity(&all).unwrap();
            assert_eq!(cpu_affinity().unwrap(), all);
            assert!(set_cpu_affinity(&[libc::CPU_SETSIZE as usize]).is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn signals_not_default_lists_an_ignored_signal_until_it_is_reset() {
        // SIGURG's default action is to do nothing, so ignoring it for a moment changes nothing
        // for the other tests of this process.
        ignore_signal(libc::SIGURG);
        assert!(signals_not_default().contains(&libc::SIGURG));
        reset_signals(&[libc::SIGURG]);
        let left = signals_not_default();
        assert!(!left.contains(&libc::SIGURG), "{left:?}");
        assert!(!left.contains(&libc::SIGKILL) && !left.contains(&libc::SIGSTOP));
    }
}
