//! Settled usage: requests already let through elsewhere (by an Envoy on
//! its quota share), charged after the fact to the buckets they draw on.

use super::plan::Joint;
use super::{DecideError, Decision, Limiter, Request, Rules};
use crate::store::{SettleBucket, Store};

impl<S: Store, E> Limiter<S, E> {
    /// Takes each request's `cost` from the buckets it draws on, together,
    /// whether or not they hold it: the requests were already admitted, so
    /// a bucket may go into debt (at most one period past empty, as a
    /// settle above its estimate does), and later requests wait. A cost of
    /// 0 takes nothing and reads the buckets' state. The decisions always
    /// allow; their buckets say what is left. A store failure follows the
    /// scopes' failure mode, like a decision.
    pub async fn charge_usage_on(
        &self,
        rules: &Rules,
        reqs: &[Request<'_>],
    ) -> Result<Vec<Decision>, DecideError> {
        let joint = match Joint::plan(rules, reqs) {
            Ok(joint) => joint,
            // An unknown scope has nothing to charge.
            Err(d) => return Ok(vec![*d; reqs.len()]),
        };
        let Some(charge) = joint.charge() else {
            return Ok(joint.nothing_to_charge());
        };
        let usage = charge.buckets.iter().map(|&b| SettleBucket {
            charge: crate::store::BucketCharge { cost: 0, ..b },
            actual: b.cost,
            mark: None,
        });
        self.settle_joint(rules, reqs, &joint, usage, "a usage charge")
            .await
    }
}
