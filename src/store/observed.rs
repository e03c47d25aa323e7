//! A store wrapped so that every call is reported: how long it took, how it
//! failed, and whether the store is available after it.
//!
//! The store does not know who listens. [`StoreObserver`] is the small
//! interface `observe` implements (its metrics), so a store call never
//! climbs out of `store` to reach them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Charge, ChargeOutcome, PenaltyAnswer, PenaltyOp, Settled, Settlement, Store, StoreError,
};

/// Told of every call through an [`Observed`] store.
pub trait StoreObserver: Send + Sync + fmt::Debug + 'static {
    /// One call to the store finished after `took`.
    fn store_called(&self, took: Duration);

    /// Whether the store can answer, read at the start and after each call.
    fn store_available(&self, available: bool);

    /// One charge or settlement failed with `error` (a call that carried
    /// several charges reports each failed one).
    fn store_failed(&self, error: &StoreError);
}

/// A store that reports each of its calls to an observer.
#[derive(Debug)]
pub struct Observed<S, O> {
    inner: S,
    observer: Arc<O>,
}

impl<S: Clone, O> Clone for Observed<S, O> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<S: Store, O: StoreObserver> Observed<S, O> {
    /// Wraps `inner`, reporting its availability at once.
    pub fn new(inner: S, observer: Arc<O>) -> Self {
        observer.store_available(inner.is_available());
        Self { inner, observer }
    }

    /// The store inside.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn called(&self, started: Instant) {
        self.observer.store_called(started.elapsed());
        self.observer.store_available(self.inner.is_available());
    }

    fn report<T>(&self, started: Instant, result: &Result<T, StoreError>) {
        if let Err(e) = result {
            self.observer.store_failed(e);
        }
        self.called(started);
    }
}

impl<S: Store, O: StoreObserver> Store for Observed<S, O> {
    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        let started = Instant::now();
        let results = self.inner.check_and_take_each(charges).await;
        // One timing per call; one error count per failed charge.
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            self.observer.store_failed(e);
        }
        self.called(started);
        results
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        let started = Instant::now();
        let result = self.inner.check_and_take_one(charge).await;
        self.report(started, &result);
        result
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        let started = Instant::now();
        let result = self.inner.settle(settlement).await;
        self.report(started, &result);
        result
    }

    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        let started = Instant::now();
        let result = self.inner.penalties(op).await;
        self.report(started, &result);
        result
    }

    async fn lease(&self, call: &super::LeaseCall<'_>) -> Result<super::LeaseOutcome, StoreError> {
        let started = Instant::now();
        let result = self.inner.lease(call).await;
        self.report(started, &result);
        result
    }

    async fn demand(
        &self,
        call: &super::DemandCall<'_>,
    ) -> Result<super::DemandAnswer, StoreError> {
        let started = Instant::now();
        let result = self.inner.demand(call).await;
        self.report(started, &result);
        result
    }

    fn is_available(&self) -> bool {
        self.inner.is_available()
    }

    fn rules_replaced(&self, scopes: &[&str]) {
        self.inner.rules_replaced(scopes);
    }

    fn condition(&self) -> super::Condition {
        self.inner.condition()
    }
}
