package httplimit

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
)

// Extractor reads one of a request's scope, identity or operation. An empty
// string is a valid answer (an empty identity is anonymous); an error
// refuses the request with 400 and takes nothing. Any func of this shape is
// an Extractor, so a caller's own logic needs no adapter.
type Extractor func(*http.Request) (string, error)

// Static always answers v, such as the scope of a proxy serving one tenant.
func Static(v string) Extractor {
	return func(*http.Request) (string, error) { return v, nil }
}

// Header answers the first value of the named header, or "" when absent.
func Header(name string) Extractor {
	return func(r *http.Request) (string, error) { return r.Header.Get(name), nil }
}

// Path answers the request's URL path, such as "/v1/search".
func Path() Extractor {
	return func(r *http.Request) (string, error) { return r.URL.Path, nil }
}

// MethodPath answers the method and the path, such as "GET /v1/search", so
// that limits can be written per route with operation globs ("POST /v1/*").
func MethodPath() Extractor {
	return func(r *http.Request) (string, error) { return r.Method + " " + r.URL.Path, nil }
}

// PathSegment answers the i-th segment of the path, counting from 0:
// PathSegment(1) of "/tenants/acme/items" is "acme". A missing segment is "".
func PathSegment(i int) Extractor {
	return func(r *http.Request) (string, error) {
		segments := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
		if i < 0 || i >= len(segments) {
			return "", nil
		}
		return segments[i], nil
	}
}

// PathValue answers a wildcard of the http.ServeMux pattern that matched,
// such as "tenant" in "/tenants/{tenant}/". It needs the middleware to wrap
// the handler registered on the mux, not the mux itself.
func PathValue(name string) Extractor {
	return func(r *http.Request) (string, error) { return r.PathValue(name), nil }
}

// RemoteIP answers the IP of the connection's peer (not of any
// X-Forwarded-For: behind a trusted proxy, use Header with the header it
// sets, or a func that parses it).
func RemoteIP() Extractor {
	return func(r *http.Request) (string, error) {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			return r.RemoteAddr, nil
		}
		return host, nil
	}
}

// PeerCertificate answers f of the verified client certificate of an mTLS
// connection, or "" when the request came without one.
func PeerCertificate(f func(*x509.Certificate) string) Extractor {
	return func(r *http.Request) (string, error) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			return "", nil
		}
		return f(r.TLS.PeerCertificates[0]), nil
	}
}

// PeerCommonName answers the subject common name of the mTLS client
// certificate, or "" without one.
func PeerCommonName() Extractor {
	return PeerCertificate(func(c *x509.Certificate) string { return c.Subject.CommonName })
}

// Required refuses (400) a request for which e answers "", such as an API
// that must not serve anonymous callers: name says what was missing.
func Required(name string, e Extractor) Extractor {
	return func(r *http.Request) (string, error) {
		v, err := e(r)
		if err != nil {
			return "", err
		}
		if v == "" {
			return "", fmt.Errorf("%s is missing", name)
		}
		return v, nil
	}
}

// FirstOf answers the first non-empty answer of es, such as an API key
// header, else the client certificate, else the peer IP.
func FirstOf(es ...Extractor) Extractor {
	return func(r *http.Request) (string, error) {
		var errs []error
		for _, e := range es {
			v, err := e(r)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if v != "" {
				return v, nil
			}
		}
		return "", errors.Join(errs...)
	}
}
