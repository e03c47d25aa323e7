// Package leasehold keeps the leases of one request for httplimit and
// grpclimit: it renews them every TTL/3 until the request ends, then
// releases them (see docs/leases.md).
package leasehold

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"sync"
	"time"

	"github.com/tollgate-rs/tollgate/clients/go/tollgate"
)

// DefaultTTL is the lease time to live unless one is configured.
const DefaultTTL = 30 * time.Second

// ErrLost is reported when a renew found a lease gone.
var ErrLost = errors.New("the request's lease was lost; the response goes on unleased")

// Leaser renews and releases leases; *tollgate.Client is one.
type Leaser interface {
	RenewLease(ctx context.Context, t tollgate.LeaseTarget, ttl time.Duration) (bool, error)
	ReleaseLease(ctx context.Context, t tollgate.LeaseTarget) error
}

// ID is v when it is a usable lease id (1 to 128 visible ASCII bytes),
// else 16 random bytes in hex.
func ID(v string) string {
	if usable(v) {
		return v
	}
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

func usable(v string) bool {
	if v == "" || len(v) > tollgate.MaxLeaseIDBytes {
		return false
	}
	for i := 0; i < len(v); i++ {
		if v[i] <= ' ' || v[i] > '~' {
			return false
		}
	}
	return true
}

// Held is the leases granted to allowed decisions: those granted and
// recorded (a degraded lease is not, so there is nothing to renew).
func Held(reqs []tollgate.Request, ds []tollgate.Decision) []tollgate.LeaseTarget {
	var out []tollgate.LeaseTarget
	for i := range ds {
		if l := ds[i].Lease; i < len(reqs) && ds[i].Allowed && l != nil && l.Granted && !l.Degraded {
			out = append(out, reqs[i].Target())
		}
	}
	return out
}

// Holder keeps the leases of one request.
type Holder struct {
	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

// Hold renews targets every ttl/3 until End is called or ctx (the
// request's) ends, then releases them. A renew that finds a lease gone
// stops renewing it and reports ErrLost; one Tollgate cannot answer is
// reported and tried again at the next tick.
func Hold(ctx context.Context, l Leaser, targets []tollgate.LeaseTarget, ttl time.Duration, report func(error)) *Holder {
	h := &Holder{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		live := append([]tollgate.LeaseTarget(nil), targets...)
		tick := time.NewTicker(max(ttl/3, time.Millisecond))
		defer tick.Stop()
	renewing:
		for len(live) > 0 {
			select {
			case <-h.stop:
				break renewing
			case <-ctx.Done():
				break renewing
			case <-tick.C:
				live = renew(ctx, l, live, ttl, report)
			}
		}
		// Released on a context of its own: the request's may be cancelled
		// (the client went away), and the slot must come back all the same.
		release, cancel := context.WithTimeout(context.WithoutCancel(ctx), ttl)
		defer cancel()
		for _, t := range targets {
			if err := l.ReleaseLease(release, t); err != nil {
				report(err)
			}
		}
	}()
	return h
}

// renew renews each live lease, and answers those still held.
func renew(ctx context.Context, l Leaser, live []tollgate.LeaseTarget, ttl time.Duration, report func(error)) []tollgate.LeaseTarget {
	kept := live[:0]
	for _, t := range live {
		renewed, err := l.RenewLease(ctx, t, ttl)
		switch {
		case err != nil:
			if ctx.Err() == nil {
				report(err)
			}
			kept = append(kept, t)
		case !renewed:
			report(ErrLost)
		default:
			kept = append(kept, t)
		}
	}
	return kept
}

// End stops renewing and waits until the leases are released, so that the
// slot is free by the time the response is over.
func (h *Holder) End() {
	h.stopOnce.Do(func() { close(h.stop) })
	<-h.done
}
