//! The `tollgate` binary: parse args → load config → telemetry → serve.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tollgate::cli::{Cli, Command};
use tollgate::config::Config;
use tollgate::pb::tollgate::v1::ShouldAllowRequest;
use tollgate::server::{self, Control};
use tollgate::{shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file, std::env::vars()) {
            Ok(config) => {
                let rules = server::compile_rules(&config)?;
                print!("{}", tollgate::cli::summary(&config, &rules));
                println!("config OK");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: invalid configuration", file.display());
                for p in &e.problems {
                    eprintln!("  {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Allow {
            addr,
            scope,
            identity,
            operation,
            cost,
            dry_run,
            attrs,
        } => {
            let request = ShouldAllowRequest {
                scope,
                identity,
                operation,
                cost,
                dry_run,
                attributes: attrs.into_iter().collect(),
            };
            let out = tollgate::cli::allow(addr, request)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config: path } => {
            // Validate everything, rules included, before binding any port.
            let config = Config::load(&path, std::env::vars())?;
            telemetry::init(&config.log, std::env::var("RUST_LOG").ok().as_deref());
            server::compile_rules(&config)?;
            let addr = config.listen_addr()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let (control, serving) = server::spawn(config, listener);

            let mut hangups = shutdown::hangups()?;
            let signals = control.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown::terminate() => {
                            let _ = signals.send(Control::Shutdown).await;
                            return;
                        }
                        _ = hangups.recv() => match Config::load(&path, std::env::vars()) {
                            Ok(c) => { let _ = signals.send(Control::Reload(Box::new(c))).await; }
                            Err(e) => tracing::error!(error = %e, "config reload refused; the old config keeps serving"),
                        },
                    }
                }
            });
            serving.await??;
            drop(control);
            Ok(ExitCode::SUCCESS)
        }
    }
}
