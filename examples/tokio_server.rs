//! A tokio TCP server whose requests run their CPU-heavy work in a forkserver pool: many
//! clients are answered concurrently, no thread blocks on a result, and a request whose task
//! panics gets an error answer while the server keeps serving.
//!
//! The protocol is one line per request: a number `n` asks for the sum of the Collatz
//! stopping times of `1..=n`; `panic` asks for a task that panics. The answer is one line,
//! `ok <value>` or `error <message>`.
//!
//! `cargo run --release --example tokio_server -- --serve 127.0.0.1:7878` serves until
//! interrupted. Without arguments (as CI runs it), it serves on a free port of 127.0.0.1 and
//! runs its own clients against it: 32 at once, each sending several requests, one of them a
//! panic; it checks every answer and exits, within a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use multiproc::{Context, Pool, task};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The CPU-heavy part of a request, run in a worker process.
#[task]
fn collatz_sum(n: u64) -> u64 {
    collatz(n)
}

/// The sum of the Collatz stopping times of `1..=n`.
fn collatz(n: u64) -> u64 {
    (1..=n)
        .map(|mut x| {
            let mut steps = 0;
            while x != 1 {
                x = if x % 2 == 0 { x / 2 } else { 3 * x + 1 };
                steps += 1;
            }
            steps
        })
        .sum()
}

/// A task that fails the way buggy code does.
#[task]
fn crash(why: String) -> u64 {
    panic!("{why}")
}

/// Answers one request line.
async fn answer(pool: &Pool, line: &str) -> String {
    let result = match line.trim() {
        "panic" => pool.apply_async(crash, "asked to panic".to_owned()),
        n => match n.parse::<u64>() {
            Ok(n) if n <= 10_000_000 => pool.apply_async(collatz_sum, n),
            _ => return format!("error not a number up to 10,000,000: {n:?}\n"),
        },
    };
    // Awaiting the result blocks no thread: the pool wakes this task when it is in.
    match result {
        Ok(pending) => match pending.await {
            Ok(value) => format!("ok {value}\n"),
            Err(e) => format!("error {}\n", e.to_string().lines().next().unwrap_or_default()),
        },
        Err(e) => format!("error {e}\n"),
    }
}

/// Serves one client until it closes its end.
async fn serve_client(pool: Arc<Pool>, stream: TcpStream) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Some(line) = lines.next_line().await? {
        writer.write_all(answer(&pool, &line).await.as_bytes()).await?;
    }
    Ok(())
}

/// Accepts clients forever, each served by its own task.
async fn serve(pool: Arc<Pool>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move {
                    if let Err(e) = serve_client(pool, stream).await {
                        eprintln!("client: {e}");
                    }
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

/// One demo client: sends its requests on one connection and checks each answer.
async fn client(address: SocketAddr, id: u64) -> Result<(), String> {
    let stream = TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    let mut requests: Vec<String> =
        (0..4).map(|i| format!("{}", 20_000 + 1_000 * id + i)).collect();
    if id.is_multiple_of(8) {
        requests.insert(1, "panic".to_owned());
    }
    for request in requests {
        writer.write_all(format!("{request}\n").as_bytes()).await.map_err(|e| e.to_string())?;
        let reply = lines.next_line().await.map_err(|e| e.to_string())?;
        let reply = reply.ok_or("the server closed the connection")?;
        let expected = match request.parse::<u64>() {
            Ok(n) => format!("ok {}", collatz(n)),
            Err(_) => "error".to_owned(),
        };
        if !reply.starts_with(&expected) {
            return Err(format!("client {id}: {request:?} got {reply:?}, expected {expected:?}"));
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve_at = std::env::args().skip_while(|a| a != "--serve").nth(1);
    // Built before the runtime starts; a forkserver pool could as well be built inside it.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = Arc::new(Context::new("forkserver")?.pool().processes(workers).build()?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(serve_at.as_deref().unwrap_or("127.0.0.1:0")).await?;
        let address = listener.local_addr()?;
        println!("serving on {address} with {workers} worker processes");
        if serve_at.is_some() {
            serve(pool, listener).await;
            return Ok(());
        }
        let server = tokio::spawn(serve(Arc::clone(&pool), listener));
        let clients: Vec<_> = (0..32).map(|id| tokio::spawn(client(address, id))).collect();
        let checked = tokio::time::timeout(Duration::from_secs(120), async {
            for client in clients {
                client.await.map_err(|e| e.to_string())??;
            }
            Ok::<(), String>(())
        })
        .await;
        server.abort();
        match checked {
            Ok(Ok(())) => {
                println!("32 clients answered concurrently, panicking requests included");
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("the clients were not all answered within 120 s".into()),
        }
    })
}
