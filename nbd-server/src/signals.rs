//! Waiting for SIGTERM/SIGINT without async machinery: block them in every
//! thread (call [`block_termination`] before spawning any), then wait in one.

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and the threads it
/// spawns afterwards.
pub fn block_termination() {
    // SAFETY: plain libc signal-mask calls on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits until SIGTERM, SIGINT or SIGHUP arrives; returns its number.
pub fn wait_for_termination() -> i32 {
    // SAFETY: as above; sigwait writes the signal number into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}
