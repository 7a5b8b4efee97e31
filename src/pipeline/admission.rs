//! Admission at the door: fixes a request's priority and deadline,
//! estimates its cost from the latency model, and refuses at once (with the
//! reason) what is over a cost cap or a tenant's budget, or cannot meet its
//! deadline even if it ran now. Nothing refused here is ever queued.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::params::RequestParams;
use crate::config::{ModelToml, TenantConfig};
use crate::error::InferError;
use crate::model::Prepared;

/// A tenant's compute budget: tokens are microseconds of compute, refilled
/// at `rate` per microsecond up to `burst`. The balance may go negative
/// when actual costs exceed estimates; the debt is repaid by refill.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst_us: f64,
    tokens_us: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(config: TenantConfig, now: Instant) -> Self {
        let burst_us = config.burst * 1e6;
        Self { rate: config.budget, burst_us, tokens_us: burst_us, updated: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_us = now.saturating_duration_since(self.updated).as_secs_f64() * 1e6;
        self.tokens_us = (self.tokens_us + elapsed_us * self.rate).min(self.burst_us);
        self.updated = self.updated.max(now);
    }

    /// Takes `amount_us` if the balance covers it; otherwise returns the
    /// balance.
    pub fn try_take(&mut self, amount_us: f64, now: Instant) -> Result<(), f64> {
        self.refill(now);
        if self.tokens_us >= amount_us {
            self.tokens_us -= amount_us;
            Ok(())
        } else {
            Err(self.tokens_us)
        }
    }

    /// Returns (positive) or charges more (negative) after the fact.
    pub fn adjust(&mut self, amount_us: f64, now: Instant) {
        self.refill(now);
        self.tokens_us = (self.tokens_us + amount_us).min(self.burst_us);
    }

    /// The balance now, in microseconds (negative while in debt).
    pub fn balance(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens_us
    }

    /// Refill rate in compute-seconds per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// What admission charged for one request; settle it after the answer.
#[derive(Debug, Clone)]
pub struct Charge {
    /// The cost estimate debited from the tenant, in microseconds.
    pub estimate_us: u64,
    /// The configured tenant it was charged to, if any.
    pub tenant: Option<String>,
}

/// What admission decided for a request it admits.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Its priority level, 1 the highest.
    pub priority: u32,
    pub charge: Charge,
}

impl Charge {
    /// The `tenant` metric label: a configured tenant, else `other`, so no
    /// client can grow the label set.
    pub fn tenant_label(&self) -> &str {
        self.tenant.as_deref().unwrap_or("other")
    }
}

/// Admission for the whole server: tenant budgets are shared by models.
#[derive(Debug, Default)]
pub struct Admission {
    tenants: HashMap<String, Mutex<TokenBucket>>,
}

/// What admission needs to know of the model version.
pub struct VersionLimits<'a> {
    pub model: &'a str,
    pub number: u64,
    pub config: &'a ModelToml,
    pub estimate: crate::batcher::latency::LatencyEstimate,
}

impl Admission {
    pub fn new(tenants: &BTreeMap<String, TenantConfig>) -> Self {
        let now = Instant::now();
        Self { tenants: tenants.iter().map(|(k, v)| (k.clone(), Mutex::new(TokenBucket::new(*v, now)))).collect() }
    }

    /// The budget a tenant spends: its own when configured, else the
    /// `default` tenant's when that is configured (so an unlisted or
    /// missing name escapes no budget), else none.
    fn bucket(&self, tenant: Option<&str>) -> Option<(&String, &Mutex<TokenBucket>)> {
        tenant
            .and_then(|t| self.tenants.get_key_value(t))
            .or_else(|| self.tenants.get_key_value(crate::security::DEFAULT_TENANT))
    }

    /// The request's deadline: the earliest of the model's default timeout,
    /// the `timeout` parameter and the call's own deadline.
    pub fn deadline(
        config: &ModelToml,
        received: Instant,
        params: &RequestParams,
        grpc_deadline: Option<Instant>,
    ) -> Instant {
        let default = received + Duration::from_secs_f64(config.default_timeout_ms / 1000.0);
        let from_param = params.timeout_us.and_then(|us| received.checked_add(Duration::from_micros(us)));
        [Some(default), from_param, grpc_deadline].into_iter().flatten().min().unwrap_or(default)
    }

    /// The refusals that need no token count, checked before a text
    /// request is tokenized so that work is never spent on it: deadline
    /// passed, queue full, tenant budget spent.
    pub fn precheck(
        &self,
        version: &VersionLimits<'_>,
        deadline: Instant,
        queued: usize,
        tenant: Option<&str>,
    ) -> Result<(), InferError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(InferError::DeadlineUnmeetable(format!(
                "model '{}': the deadline passed before the request could be prepared",
                version.model
            )));
        }
        if queued >= version.config.max_queue {
            return Err(InferError::QueueFull {
                model: version.model.into(),
                version: version.number,
                max_queue: version.config.max_queue,
            });
        }
        if let Some((name, bucket)) = self.bucket(tenant) {
            let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
            let available = bucket.balance(now);
            if available <= 0.0 {
                return Err(InferError::TenantBudget {
                    tenant: name.clone(),
                    needed_us: 1,
                    available_us: available as i64,
                    rate: bucket.rate(),
                });
            }
        }
        Ok(())
    }

    /// Admits a request of `rows` rows and prepared `size` due at
    /// `deadline`, or says why not: its priority, cost caps, whether the
    /// deadline can be met, and the tenant's budget, which is charged the
    /// cost estimate. `tenant` comes from the request parameter or the
    /// transport (`x-kiln-tenant` metadata).
    pub fn admit(
        &self,
        version: &VersionLimits<'_>,
        rows: usize,
        size: &Prepared,
        params: &RequestParams,
        deadline: Instant,
        tenant: Option<&str>,
    ) -> Result<Decision, InferError> {
        let config = version.config;
        let levels = config.priority_levels;
        let priority = match params.priority {
            None | Some(0) => config.default_priority_level(),
            Some(p) if p <= levels as u64 => p as u32,
            Some(p) => {
                return Err(InferError::InvalidArgument(format!(
                    "parameter 'priority': {p} is not a level of model '{}': 1 (highest) to {levels}, or 0 for the \
                     default ({})",
                    version.model,
                    config.default_priority_level()
                )));
            }
        };

        let units = rows * size.longest;
        let max_units = config.max_batch_units();
        if size.longest > 1 && units > max_units {
            return Err(InferError::InvalidArgument(format!(
                "model '{}': {rows} texts padded to {} tokens make {units} tokens, more than max_batch_tokens \
                 {max_units}; send fewer texts per request",
                version.model, size.longest
            )));
        }
        let now = Instant::now();
        let alone = version.estimate.predict(units);
        if now + alone > deadline {
            return Err(InferError::DeadlineUnmeetable(format!(
                "model '{}': deadline cannot be met: {} µs left, but computing {} takes about {} µs even if run now",
                version.model,
                deadline.saturating_duration_since(now).as_micros(),
                describe_size(rows, size),
                alone.as_micros()
            )));
        }

        let estimate_us = version.estimate.cost_estimate(units).as_micros() as u64;
        let caps = [(params.max_cost_us, "request's"), (config.max_cost_us, "model's")];
        if let Some((cap_us, source_of_cap)) =
            caps.into_iter().filter_map(|(cap, source)| cap.map(|c| (c, source))).min_by_key(|(c, _)| *c)
            && estimate_us > cap_us
        {
            return Err(InferError::CostCap { model: version.model.into(), estimate_us, cap_us, source_of_cap });
        }

        let bucket = self.bucket(tenant);
        let tenant = bucket.map(|(name, _)| name.clone());
        if let Some((name, bucket)) = bucket {
            let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(available) = bucket.try_take(estimate_us as f64, now) {
                return Err(InferError::TenantBudget {
                    tenant: name.clone(),
                    needed_us: estimate_us,
                    available_us: available as i64,
                    rate: bucket.rate(),
                });
            }
        }
        Ok(Decision { priority, charge: Charge { estimate_us, tenant } })
    }

    /// Reconciles the tenant's debit with what the request really cost
    /// (`None`: unknown, keep the estimate; 0: never computed, refund).
    pub fn settle(&self, charge: &Charge, actual_us: Option<u64>) {
        let (Some(name), Some(actual)) = (&charge.tenant, actual_us) else { return };
        if let Some(bucket) = self.tenants.get(name) {
            let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
            bucket.adjust(charge.estimate_us as f64 - actual as f64, Instant::now());
        }
    }
}

/// "3 rows", or "3 texts of up to 40 tokens".
fn describe_size(rows: usize, size: &Prepared) -> String {
    match size.longest {
        1 => format!("{rows} rows"),
        longest => format!("{rows} texts of up to {longest} tokens"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn bucket_spends_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        // Half a compute-second per second, one second of burst.
        let mut b = TokenBucket::new(TenantConfig { budget: 0.5, burst: 1.0 }, t0);
        assert!(b.try_take(600_000.0, t0).is_ok());
        assert_eq!(b.try_take(600_000.0, t0), Err(400_000.0));
        // After 0.4 s: 400k + 200k = 600k.
        assert!(b.try_take(600_000.0, t0 + SEC * 2 / 5).is_ok());
        // Never more than the burst, however long it rests.
        assert_eq!(b.try_take(2e6, t0 + 100 * SEC), Err(1e6));
    }

    #[test]
    fn actual_cost_over_the_estimate_leaves_a_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(TenantConfig { budget: 1.0, burst: 0.001 }, t0);
        assert!(b.try_take(1000.0, t0).is_ok());
        b.adjust(-500.0, t0); // cost 1500 µs, estimated 1000
        assert_eq!(b.try_take(1.0, t0), Err(-500.0));
        assert!(b.try_take(1.0, t0 + Duration::from_micros(600)).is_ok());
    }
}
