//! Connections that can be cut from outside: at the end of the shutdown
//! grace, or of `max_connection_age` plus its grace.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

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
