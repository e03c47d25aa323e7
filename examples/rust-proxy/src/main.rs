//! rust-proxy's command line: parse the flags, bind, serve until SIGTERM or
//! Ctrl-C. Everything else is in the library.

use clap::Parser;
use rust_proxy::{Args, limited_router, serve};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let router = limited_router(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    // Tests and scripts read this line to learn the port of `--listen
    // HOST:0`.
    println!("rust-proxy listening on {}", listener.local_addr()?);
    serve(listener, router, shutdown()).await?;
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        // If the handler cannot be installed, only SIGTERM stops us.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
