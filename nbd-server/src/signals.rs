//! Waiting for SIGTERM/SIGINT without async machinery: block them in every
//! thread (call [`block_termination`] before spawning any), then wait in one.

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
