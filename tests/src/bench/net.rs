//! The compiled TCP client and server of the connection-latency section. They run inside pod
//! namespaces as subcommands of this binary.
use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::Context;

/// `connect-client ADDR COUNT`: COUNT sequential TCP connects to ADDR; prints each connect's
/// duration in nanoseconds (from socket creation to the handshake's completion), one per
/// line. Each connection is closed with a reset (SO_LINGER 0): no TIME_WAIT, so the runs do
/// not run out of ports, and the server side has nothing to clean up.
pub fn connect_client(args: &[String]) -> anyhow::Result<()> {
    let [addr, count] = args else {
        anyhow::bail!("usage: connect-client ADDR:PORT COUNT");
    };
    let addr: SocketAddr = addr.parse().context("address")?;
    let count: usize = count.parse().context("count")?;
    let mut out = String::with_capacity(count * 8);
    for i in 0..count {
        let start = Instant::now();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {} to {addr}", i + 1))?;
        let elapsed = start.elapsed();
        reset_on_close(&stream);
        drop(stream);
        out.push_str(&elapsed.as_nanos().to_string());
        out.push('\n');
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// `wait-connect ADDR TIMEOUT_MS`: succeeds once ADDR accepts a connection.
pub fn wait_connect(args: &[String]) -> anyhow::Result<()> {
    let [addr, timeout] = args else {
        anyhow::bail!("usage: wait-connect ADDR:PORT TIMEOUT_MS");
    };
    let addr: SocketAddr = addr.parse()?;
    let deadline = Instant::now() + Duration::from_millis(timeout.parse()?);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => {
                reset_on_close(&stream);
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => return Err(e).context(format!("{addr}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `serve PORT...`: accepts connections on every PORT (all addresses of both families: one
/// dual-stack socket) and closes them at once, with a deep accept queue so that no SYN is
/// ever dropped for want of room.
pub fn serve(args: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(!args.is_empty(), "usage: serve PORT...");
    let mut threads = Vec::new();
    for port in args {
        let port: u16 = port.parse()?;
        let listener = TcpListener::bind(("::", port))?;
        // SAFETY: listen() again on a listening socket only changes its backlog.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        }));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}
