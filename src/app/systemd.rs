//! Telling systemd what the process is doing (`Type=notify` units): READY
//! once the listeners are bound, RELOADING and READY around a reload,
//! STOPPING when the drain begins (sd_notify(3)'s protocol: one datagram
//! to the socket named by `$NOTIFY_SOCKET`). Without that variable (not
//! under systemd) nothing is sent.
//!
//! Must not fail the process: systemd not listening is logged, not fatal.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, ...) to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(error) = send(&socket, state) {
        tracing::warn!(%error, state, "could not notify systemd");
    }
}

fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    // `@name` is a socket in the abstract namespace.
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sender.send_to_addr(state.as_bytes(), &address)?;
    } else {
        sender.send_to(state.as_bytes(), socket)?;
    }
    Ok(())
}

/// `RELOADING=1` carries the monotonic time systemd uses to tell reloads
/// apart (sd_notify(3): `MONOTONIC_USEC`).
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct it is given and nothing else.
    let known = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } == 0;
    let micros = if known {
        u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
            + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000
    } else {
        0
    };
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={micros}"));
}
