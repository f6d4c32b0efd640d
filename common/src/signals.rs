//! Signals without async machinery.
//!
//! Daemons wait for SIGTERM/SIGINT/SIGHUP in one thread: block them in
//! every thread (call [`block_termination`] before spawning any), then
//! [`wait_for_termination`]. A blocked mask survives `exec`, so children
//! that are stopped with SIGTERM must start with a clean one
//! ([`clear_mask_on_exec`]).

use std::process::Command;

/// SIGTERM, SIGINT and SIGHUP.
fn termination_set() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local, zero-initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks the termination signals in the calling thread and the threads it
/// spawns afterwards.
pub fn block_termination() {
    let set = termination_set();
    // SAFETY: `set` is a valid signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits until SIGTERM, SIGINT or SIGHUP arrives; returns its number.
pub fn wait_for_termination() -> i32 {
    let set = termination_set();
    let mut sig = 0;
    // SAFETY: sigwait writes the signal number into `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// Unblocks every signal in the calling thread. Async-signal-safe: may be
/// called between `fork` and `exec` (in a `pre_exec` hook).
pub fn clear_mask() {
    // SAFETY: sigemptyset and pthread_sigmask on a local set; both are
    // async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Makes the child `cmd` starts begin with no blocked signal, whatever this
/// process blocks (a daemon that waits with [`wait_for_termination`]
/// blocks SIGTERM, and the child would otherwise ignore a stop request).
pub fn clear_mask_on_exec(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook only calls `clear_mask`, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            clear_mask();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_starts_with_a_clean_mask() {
        // Block in a helper thread only, so the test harness is unaffected.
        let out = std::thread::spawn(|| {
            block_termination();
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "grep SigBlk /proc/self/status"]);
            clear_mask_on_exec(&mut cmd);
            cmd.output()
        })
        .join()
        .unwrap();
        let Ok(out) = out else { return }; // no sh: nothing to check
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("0000000000000000"), "{text}");
    }
}
