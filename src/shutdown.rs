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
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
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

/// A connection that can be cut from outside: once `cancel` fires, or its
/// deadline passes, every read and write fails, which ends hyper's
/// connection task and the calls on it.
#[derive(Debug)]
pub(crate) struct Cancellable<IO> {
    io: IO,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The end of `max_connection_age` plus its grace: tonic sends GOAWAY
    /// at the age, and this closes what is still open after the grace.
    /// (tonic's own `max_connection_age_grace` skips the GOAWAY, so calls
    /// would be cut without warning; hence this.)
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> Cancellable<IO> {
    pub(crate) fn new(io: IO, cancel: &CancellationToken) -> Self {
        Self {
            io,
            cancelled: Box::pin(cancel.clone().cancelled_owned()),
            deadline: None,
        }
    }

    /// Also cut the connection `after` from now.
    pub(crate) fn with_deadline(mut self, after: Duration) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep(after)));
        self
    }

    /// Polled before each read and write: also registers the waker, so a
    /// connection idle in a read wakes up to fail when cancelled.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Poll::Ready(()) = self.cancelled.as_mut().poll(cx) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "cancelled at the end of the shutdown grace",
            ));
        }
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "max_connection_age and its grace have passed",
            )),
            _ => Ok(()),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Cancellable<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Cancellable<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Cancellable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
