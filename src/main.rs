//! The `tollgate` binary: parse args → load config → logs → serve.
//!
//! Everything that can refuse a config runs before the listener is bound,
//! so a bad config exits without ever taking the port.

mod cli;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tollgate::config::ConfigSource;
use tollgate::observe::logs;
use tollgate::reload::Prepared;
use tollgate::server;
use tollgate::shutdown;

use cli::{Cli, Command};

/// mimalloc, not glibc's malloc: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        Command::CheckConfig {
            envoy_compat: Some(dir),
            ..
        } => Ok(cli::check_envoy_compat(&dir)),
        Command::CheckConfig { file, .. } => match file {
            Some(file) => Ok(cli::check_config(&file)),
            None => anyhow::bail!("check-config needs a FILE or --envoy-compat DIR"),
        },
        Command::Allow(args) => {
            print!("{}", cli::allow(*args).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Top(args) => {
            cli::top(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(args) => {
            print!("{}", cli::explain(args).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ban(args) => {
            print!("{}", cli::ban(args).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Unban(args) => {
            print!("{}", cli::unban(args).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bans(args) => {
            print!("{}", cli::bans(args).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config } => {
            let prepared = Prepared::load(ConfigSource::new(config, std::env::vars()))?;
            let log = &prepared.config.log;
            logs::init(log, std::env::var("RUST_LOG").ok().as_deref());
            let addr = prepared.config.listen_addr()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let (control, serving) = server::spawn(prepared, listener);
            shutdown::forward_signals(control).context("installing signal handlers")?;
            serving.await??;
            Ok(ExitCode::SUCCESS)
        }
    }
}
