//! [`ResponseFuture`]: first the decision, then, if allowed, the inner call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower::Service;

use super::body::ResponseBody;
use super::check::{CheckFuture, Checked};
use super::lease::LeaseGuard;

pin_project! {
    /// The response future of [`super::Tollgate`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, S::Future, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, B> {
        /// Asking Tollgate; `service` was polled ready and waits for the
        /// request.
        Checking { check: CheckFuture<B>, service: Option<S> },
        /// Allowed: the inner service has the request; `headers` go on its
        /// response.
        Calling { #[pin] future: F, headers: HeaderMap, lease: Option<LeaseGuard> },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(check: CheckFuture<B>, service: S) -> Self {
        Self {
            state: State::Checking {
                check,
                service: Some(service),
            },
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Checking { .. } => "Checking",
            State::Calling { .. } => "Calling",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { check, service } => match ready!(check.as_mut().poll(cx)) {
                    Checked::Respond(response) => {
                        return Poll::Ready(Ok(response.map(ResponseBody::local)));
                    }
                    Checked::Forward {
                        request,
                        headers,
                        lease,
                    } => {
                        let Some(mut service) = service.take() else {
                            // Only reachable by polling again after Ready, which
                            // the Future contract forbids.
                            panic!("ResponseFuture polled after completion");
                        };
                        let future = service.call(request);
                        this.state.set(State::Calling {
                            future,
                            headers,
                            lease,
                        });
                    }
                },
                StateProj::Calling {
                    future,
                    headers,
                    lease,
                } => {
                    // An error drops the lease with the future: released.
                    let mut response = ready!(future.poll(cx))?;
                    for (name, value) in headers.iter() {
                        response.headers_mut().append(name, value.clone());
                    }
                    let lease = lease.take();
                    return Poll::Ready(Ok(response.map(|b| ResponseBody::inner(b, lease))));
                }
            }
        }
    }
}
