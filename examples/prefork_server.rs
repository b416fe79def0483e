//! A pre-fork server: one `TcpListener` handed to several worker processes, each accepting
//! connections on it; the example connects to it and prints which worker answered.
//!
//! `cargo run --release --example prefork_server`

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use multiproc::{Context, Fd, task};

/// Accepts connections forever, answering each with the worker's number and pid.
#[task]
fn serve(listener: Fd<TcpListener>, worker: u32) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = writeln!(stream, "worker {worker} (pid {}) answered", std::process::id());
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = Context::default();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    println!("start method: {}; listening on {address}", ctx.start_method());

    // Every worker gets the same listening socket (a duplicate of the descriptor); the kernel
    // hands each connection to one of the processes blocked in accept().
    let workers = (0..3)
        .map(|i| {
            let socket = Fd::new(listener.try_clone()?);
            Ok(ctx.process(serve, (socket, i)).daemon(true).start()?)
        })
        .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
    drop(listener);

    for _ in 0..9 {
        let stream = TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        print!("{line}");
    }
    // The workers are daemons: dropping their handles kills and reaps them.
    drop(workers);
    Ok(())
}
