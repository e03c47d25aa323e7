//! Where a request's scope, identity, operation and attributes come from.

use std::fmt;
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;

/// The authenticated identity of the peer, such as the subject or a SAN of
/// its mTLS client certificate. Tollgate's layer does not terminate TLS: the
/// server that does puts this into the request's extensions, and
/// [`Extractor::peer`] reads it from there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub String);

type ExtractFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Takes one value (a scope, an identity, an operation or an attribute)
/// from a request's head. The body is never read here; MCP extraction is
/// separate (see [`crate::layer::McpLayer`]).
#[derive(Clone)]
pub struct Extractor(Source);

#[derive(Clone)]
enum Source {
    Fixed(String),
    Header(HeaderName),
    Path,
    PathSegment(usize),
    Peer,
    Fn(Arc<ExtractFn>),
}

impl Extractor {
    /// The same value for every request, such as a gateway's one scope.
    pub fn fixed(value: impl Into<String>) -> Self {
        Self(Source::Fixed(value.into()))
    }

    /// The value of a request header; absent when the header is. A value
    /// that is not visible ASCII is refused with a 400.
    pub fn header(name: HeaderName) -> Self {
        Self(Source::Header(name))
    }

    /// The request's path, without the query.
    pub fn path() -> Self {
        Self(Source::Path)
    }

    /// One segment of the path, counted from 0 after the leading `/`:
    /// segment 1 of `/tenants/acme/items` is `acme`. Absent when the path is
    /// shorter.
    pub fn path_segment(index: usize) -> Self {
        Self(Source::PathSegment(index))
    }

    /// The [`PeerIdentity`] that the TLS-terminating server put into the
    /// request's extensions; absent when there is none.
    pub fn peer() -> Self {
        Self(Source::Peer)
    }

    /// Anything else, computed from the request head; `None` means absent.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self(Source::Fn(Arc::new(f)))
    }

    /// The value for this request: `Ok(None)` when absent, `Err` (a reason)
    /// when present but unusable.
    pub(crate) fn extract(&self, parts: &Parts) -> Result<Option<String>, String> {
        Ok(match &self.0 {
            Source::Fixed(v) => Some(v.clone()),
            Source::Header(name) => match parts.headers.get(name) {
                None => None,
                Some(v) => Some(
                    v.to_str()
                        .map_err(|_| format!("header {name} is not visible ASCII"))?
                        .to_owned(),
                ),
            },
            Source::Path => Some(parts.uri.path().to_owned()),
            Source::PathSegment(i) => parts
                .uri
                .path()
                .trim_start_matches('/')
                .split('/')
                .nth(*i)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            Source::Peer => parts.extensions.get::<PeerIdentity>().map(|p| p.0.clone()),
            Source::Fn(f) => f(parts),
        })
    }
}

impl fmt::Debug for Extractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::Fixed(v) => f.debug_tuple("Fixed").field(v).finish(),
            Source::Header(h) => f.debug_tuple("Header").field(h).finish(),
            Source::Path => f.write_str("Path"),
            Source::PathSegment(i) => f.debug_tuple("PathSegment").field(i).finish(),
            Source::Peer => f.write_str("Peer"),
            Source::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, header: Option<&[u8]>) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some(v) = header {
            b = b.header("x-user", http::HeaderValue::from_bytes(v).unwrap());
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn each_source_reads_its_part_of_the_request() {
        let mut p = parts("/tenants/acme/items?x=1", Some(b"alice"));
        let x_user = HeaderName::from_static("x-user");
        assert_eq!(
            Extractor::fixed("demo").extract(&p),
            Ok(Some("demo".into()))
        );
        assert_eq!(
            Extractor::header(x_user.clone()).extract(&p),
            Ok(Some("alice".into()))
        );
        assert_eq!(
            Extractor::path().extract(&p),
            Ok(Some("/tenants/acme/items".into()))
        );
        assert_eq!(
            Extractor::path_segment(1).extract(&p),
            Ok(Some("acme".into()))
        );
        assert_eq!(Extractor::path_segment(5).extract(&p), Ok(None));
        assert_eq!(Extractor::peer().extract(&p), Ok(None));
        p.extensions.insert(PeerIdentity("spiffe://a/b".into()));
        assert_eq!(
            Extractor::peer().extract(&p),
            Ok(Some("spiffe://a/b".into()))
        );
        let method = Extractor::from_fn(|p| Some(p.method.to_string()));
        assert_eq!(method.extract(&p), Ok(Some("GET".into())));
        let absent = parts("/", None);
        assert_eq!(Extractor::header(x_user).extract(&absent), Ok(None));
    }

    #[test]
    fn a_header_that_is_not_visible_ascii_is_refused() {
        let p = parts("/", Some(b"caf\xe9"));
        let err = Extractor::header(HeaderName::from_static("x-user"))
            .extract(&p)
            .unwrap_err();
        assert!(err.contains("x-user"), "{err}");
    }
}
