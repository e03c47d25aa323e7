package tollgate

import (
	"sync"
	"time"
)

// breaker stops calls to a Tollgate that keeps failing, so a hung limiter
// costs a request nothing instead of a full deadline. After threshold
// failures in a row it opens for cooldown; the first call after that is a
// probe (the others keep failing fast while it runs), and its success closes
// the breaker.
//
// A plain mutex: the critical sections are a few loads and stores.
type breaker struct {
	threshold int
	cooldown  time.Duration

	mu        sync.Mutex
	failures  int
	last      error
	openUntil time.Time
}

// allow returns nil when a call may go ahead, else why not.
func (b *breaker) allow(now time.Time) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failures < b.threshold {
		return nil
	}
	if now.Before(b.openUntil) {
		return &circuitOpenError{failures: b.failures, last: b.last}
	}
	// This call is the probe; everyone else waits out another cooldown
	// unless it succeeds.
	b.openUntil = now.Add(b.cooldown)
	return nil
}

func (b *breaker) success() {
	b.mu.Lock()
	b.failures = 0
	b.last = nil
	b.mu.Unlock()
}

func (b *breaker) failure(now time.Time, err error) {
	b.mu.Lock()
	b.failures++
	b.last = err
	if b.failures >= b.threshold {
		b.openUntil = now.Add(b.cooldown)
	}
	b.mu.Unlock()
}
