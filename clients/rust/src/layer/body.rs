//! The bodies the layer hands on: the request's own, or the bytes it read
//! for MCP extraction; the inner service's response, or the layer's own.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

use super::lease::LeaseGuard;

pin_project! {
    /// The request body the inner service receives: untouched and streaming,
    /// or, when the layer read it for MCP extraction, the same bytes from
    /// memory.
    #[project = RequestBodyProj]
    #[derive(Debug)]
    pub enum RequestBody<B> {
        /// The original body, not read by the layer.
        Streaming { #[pin] body: B },
        /// The bytes the layer read, byte for byte. Trailers, if the
        /// original had any, are not kept.
        Read { #[pin] body: Full<Bytes> },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn streaming(body: B) -> Self {
        Self::Streaming { body }
    }

    pub(crate) fn read(bytes: Bytes) -> Self {
        Self::Read {
            body: Full::new(bytes),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            RequestBodyProj::Streaming { body } => body.poll_frame(cx),
            RequestBodyProj::Read { body } => body.poll_frame(cx).map_err(never),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Streaming { body } => body.is_end_stream(),
            Self::Read { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Streaming { body } => body.size_hint(),
            Self::Read { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// The response body: the inner service's, or one the layer wrote (a 429,
    /// 413, 400 or 503).
    #[project = ResponseBodyProj]
    #[derive(Debug)]
    pub enum ResponseBody<B> {
        /// The inner service's body, and the request's leases, released
        /// when it ends or is dropped.
        Inner { #[pin] body: B, lease: Option<LeaseGuard> },
        /// The layer's own answer.
        Local { #[pin] body: Full<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B, lease: Option<LeaseGuard>) -> Self {
        Self::Inner { body, lease }
    }

    pub(crate) fn local(body: Full<Bytes>) -> Self {
        Self::Local { body }
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            ResponseBodyProj::Inner { body, lease } => {
                let frame = body.poll_frame(cx);
                if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
                    // The body ended (or broke): give the slot back now,
                    // not when the connection gets round to dropping it.
                    *lease = None;
                }
                frame
            }
            ResponseBodyProj::Local { body } => body.poll_frame(cx).map_err(never),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body, .. } => body.is_end_stream(),
            Self::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body, .. } => body.size_hint(),
            Self::Local { body } => body.size_hint(),
        }
    }
}

fn never<E>(e: Infallible) -> E {
    match e {}
}
