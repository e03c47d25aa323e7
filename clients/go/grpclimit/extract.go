package grpclimit

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
)

// Extractor reads one of a call's scope, identity or operation from its
// context and full method name ("/pkg.Service/Method"). An empty string is
// a valid answer; an error refuses the call with INVALID_ARGUMENT. Any func
// of this shape is an Extractor.
type Extractor func(ctx context.Context, fullMethod string) (string, error)

// Static always answers v.
func Static(v string) Extractor {
	return func(context.Context, string) (string, error) { return v, nil }
}

// Metadata answers the first value of the incoming metadata key (lower
// case, such as "x-user"), or "" when absent.
func Metadata(key string) Extractor {
	return func(ctx context.Context, _ string) (string, error) {
		if v := metadata.ValueFromIncomingContext(ctx, key); len(v) > 0 {
			return v[0], nil
		}
		return "", nil
	}
}

// FullMethod answers the call's full method, such as
// "/tollgate.v1.RateLimiter/ShouldAllow", so that limits can name methods
// with operation globs ("/pkg.Service/*").
func FullMethod() Extractor {
	return func(_ context.Context, fullMethod string) (string, error) { return fullMethod, nil }
}

// PeerIP answers the IP of the connection's peer, or "" when unknown.
func PeerIP() Extractor {
	return func(ctx context.Context, _ string) (string, error) {
		p, ok := peer.FromContext(ctx)
		if !ok || p.Addr == nil {
			return "", nil
		}
		host, _, err := net.SplitHostPort(p.Addr.String())
		if err != nil {
			return p.Addr.String(), nil
		}
		return host, nil
	}
}

// PeerCertificate answers f of the verified client certificate of an mTLS
// connection, or "" when the call came without one.
func PeerCertificate(f func(*x509.Certificate) string) Extractor {
	return func(ctx context.Context, _ string) (string, error) {
		p, ok := peer.FromContext(ctx)
		if !ok {
			return "", nil
		}
		info, ok := p.AuthInfo.(credentials.TLSInfo)
		if !ok || len(info.State.PeerCertificates) == 0 {
			return "", nil
		}
		return f(info.State.PeerCertificates[0]), nil
	}
}

// PeerCommonName answers the subject common name of the mTLS client
// certificate, or "" without one.
func PeerCommonName() Extractor {
	return PeerCertificate(func(c *x509.Certificate) string { return c.Subject.CommonName })
}

// Required refuses a call for which e answers "": name says what was
// missing.
func Required(name string, e Extractor) Extractor {
	return func(ctx context.Context, fullMethod string) (string, error) {
		v, err := e(ctx, fullMethod)
		if err != nil {
			return "", err
		}
		if v == "" {
			return "", fmt.Errorf("%s is missing", name)
		}
		return v, nil
	}
}

// FirstOf answers the first non-empty answer of es.
func FirstOf(es ...Extractor) Extractor {
	return func(ctx context.Context, fullMethod string) (string, error) {
		var errs []error
		for _, e := range es {
			v, err := e(ctx, fullMethod)
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
