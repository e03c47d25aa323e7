//! The lifecycle: signals in, and the whole stop sequence out.
//!
//! SIGHUP asks for a reload; SIGTERM and SIGINT ask for a shutdown. Both
//! arrive as a [`Control`] on one channel, which tests drive directly. A
//! shutdown runs, in order:
//!
//! 1. health goes NOT_SERVING, so load balancers stop sending new calls;
//! 2. `drain_delay`: calls are still answered while they notice;
//! 3. the listener closes; calls in flight get `shutdown_grace` to finish;
//! 4. what is still running then is cancelled: its connection is closed.

use std::io;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// What a running server can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Read the config again from where it came from, and swap in its rules.
    /// A config that does not validate is refused, and the old one keeps
    /// serving.
    Reload,
    /// Run the stop sequence.
    Shutdown,
}

/// Forwards SIGHUP as [`Control::Reload`] and SIGTERM or SIGINT as
/// [`Control::Shutdown`] to `control`, until the receiver is gone.
pub fn forward_signals(control: mpsc::Sender<Control>) -> io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Control::Shutdown }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Control::Shutdown }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading the config"); Control::Reload }
            };
            if control.send(msg).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Handles `control` until a shutdown is asked for (or every sender is
/// gone), calling `reload` for each reload on the way.
pub(crate) async fn until_shutdown(
    control: &mut mpsc::Receiver<Control>,
    mut reload: impl FnMut(),
) {
    while let Some(msg) = control.recv().await {
        match msg {
            Control::Reload => reload(),
            Control::Shutdown => return,
        }
    }
}

/// Steps 1 and 2: every health service goes NOT_SERVING, then calls are
/// still answered for `drain_delay`.
pub(crate) async fn drain(health: &HealthReporter, services: &[&str], drain_delay: Duration) {
    for service in services {
        health
            .set_service_status(*service, ServingStatus::NotServing)
            .await;
    }
    tracing::info!(?drain_delay, "draining");
    tokio::time::sleep(drain_delay).await;
}

/// Steps 3 and 4 around a server future that stops accepting once its stop
/// signal fires (`stopping`). After that, calls in flight get `grace`; then
/// `cancel` closes every connection accepted through [`Cancellable`].
pub(crate) async fn serve_with_grace<F, E>(
    serve: F,
    stopping: CancellationToken,
    cancel: CancellationToken,
    grace: Duration,
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    let mut serve = std::pin::pin!(serve);
    tokio::select! {
        done = &mut serve => return done,
        () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {}
    }
    tracing::warn!(
        ?grace,
        "shutdown grace expired; cancelling the calls still in flight"
    );
    cancel.cancel();
    // A cancelled connection fails its next read or write at once, so the
    // server finishes promptly; never wait on it without bound, though.
    match tokio::time::timeout(Duration::from_secs(1), serve).await {
        Ok(done) => done,
        Err(_) => Ok(()),
    }
}
