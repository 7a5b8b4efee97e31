//! What the adaptive wait knows of the traffic: how many requests arrive,
//! and when.
//!
//! Arrivals are not memoryless. Clients that wait for each answer come
//! back a round trip after their batch finished, together; bursts bring
//! many requests within microseconds of each other; open-loop traffic
//! arrives at its rate whatever the server does. Profiles capture these:
//! the arrival intensity by time since the last batch finished (per
//! request it answered), and by time since the last arrival (kept apart
//! by how many arrived since the last finish). Each is kept in [`BUCKETS`] steps
//! up to the horizon (the longest the adaptive wait may last) and one
//! open tail beyond it, each step's arrivals divided by the time the
//! clock spent in that step (so steps cut short by the next anchor are
//! not under-counted). Counts and times decay together (half-life
//! [`HALF_LIFE`]), so the profiles follow the load within a second or two
//! and fade when traffic stops.

use std::time::{Duration, Instant};

/// How fast old evidence stops counting.
pub const HALF_LIFE: Duration = Duration::from_secs(1);

/// Steps between a finish and the horizon.
pub const BUCKETS: usize = 32;

/// A step is trusted once the clock has spent this many step widths in it
/// (decayed): before that its arrivals read as none.
const MIN_WINDOWS: f64 = 16.0;

/// Decayed arrivals and exposure after each finish, by time since it.
#[derive(Debug, Clone)]
struct ArrivalProfile {
    /// One step's width: the horizon over [`BUCKETS`].
    step: Duration,
    /// The last finish, and arrivals since it.
    anchor: Option<Instant>,
    since_anchor: usize,
    /// What the anchor weighs: the requests a finish answered (clients
    /// that may come back), 1 for an arrival. Exposure counts in
    /// weight-seconds, so intensities are per unit of weight.
    weight: f64,
    /// Whether the weight counts clients that come back (a finish's
    /// answers), each at most once.
    returns: bool,
    /// Up to when exposure has been counted.
    counted_to: Instant,
    /// When the counts last decayed.
    decayed_at: Instant,
    /// Per step, then the open tail: arrivals and seconds of exposure.
    arrivals: [f64; BUCKETS + 1],
    exposure_s: [f64; BUCKETS + 1],
}

impl ArrivalProfile {
    /// A profile looking `horizon` past each finish (at least a microsecond
    /// per step).
    fn new(now: Instant, horizon: Duration) -> Self {
        let step = (horizon / BUCKETS as u32).max(Duration::from_micros(1));
        Self {
            step,
            anchor: None,
            since_anchor: 0,
            weight: 1.0,
            returns: false,
            counted_to: now,
            decayed_at: now,
            arrivals: [0.0; BUCKETS + 1],
            exposure_s: [0.0; BUCKETS + 1],
        }
    }

    /// A profile of arrivals at a steady rate, as if measured for ever.
    fn steady(rate_per_s: f64, horizon: Duration) -> Self {
        let now = Instant::now();
        let mut profile = Self::new(now, horizon);
        let step_s = profile.step.as_secs_f64();
        let exposure = step_s * MIN_WINDOWS * 1e3;
        for (a, e) in profile.arrivals.iter_mut().zip(profile.exposure_s.iter_mut()) {
            *e = exposure;
            *a = rate_per_s.max(0.0) * exposure;
        }
        profile
    }

    fn horizon(&self) -> Duration {
        self.step * BUCKETS as u32
    }

    /// Counts the time from `counted_to` to `now` as exposure of the steps
    /// it covered since the anchor.
    fn expose(&mut self, now: Instant) {
        let Some(anchor) = self.anchor else {
            self.counted_to = self.counted_to.max(now);
            return;
        };
        let from = self.counted_to.max(anchor).saturating_duration_since(anchor);
        let to = now.saturating_duration_since(anchor);
        if to <= from {
            return;
        }
        let horizon = self.horizon();
        let mut at = from;
        while at < to.min(horizon) {
            let j = (at.as_nanos() / self.step.as_nanos()) as usize;
            let end = (self.step * (j as u32 + 1)).min(to);
            self.exposure_s[j] += (end - at).as_secs_f64() * self.weight;
            at = end;
        }
        if to > horizon {
            self.exposure_s[BUCKETS] += (to - from.max(horizon)).as_secs_f64() * self.weight;
        }
        self.counted_to = now;
    }

    fn decay(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.decayed_at);
        // Decaying more often than every ~1 % of a half-life changes nothing
        // that matters, and costs a pass over the steps.
        if elapsed < HALF_LIFE / 128 {
            return;
        }
        let keep = 0.5f64.powf(elapsed.as_secs_f64() / HALF_LIFE.as_secs_f64());
        for v in self.arrivals.iter_mut().chain(self.exposure_s.iter_mut()) {
            *v *= keep;
        }
        self.decayed_at = now;
    }

    /// The anchor's time ends at `now`: exposure stops counting until the
    /// profile is anchored again.
    fn release(&mut self, now: Instant) {
        self.expose(now);
        self.anchor = None;
    }

    /// A request arrived at `now`.
    fn arrived(&mut self, now: Instant) {
        self.expose(now);
        if let Some(anchor) = self.anchor {
            let offset = now.saturating_duration_since(anchor);
            let j = ((offset.as_nanos() / self.step.as_nanos()) as usize).min(BUCKETS);
            self.arrivals[j] += 1.0;
            self.since_anchor += 1;
        }
    }

    /// Time from now on counts from `now`: a batch finished, or a request
    /// arrived, depending on what the profile follows.
    fn anchor_at(&mut self, now: Instant, weight: f64) {
        self.expose(now);
        self.decay(now);
        self.anchor = Some(now);
        self.weight = weight.max(1.0);
        self.since_anchor = 0;
        self.counted_to = now;
    }

    /// Arrivals per second in step `j` (the tail for `BUCKETS`), zero until
    /// trusted, unless `pooled` (a profile of the same steps over more
    /// evidence) is, when its reading stands in.
    fn intensity(&self, j: usize, pooled: Option<&ArrivalProfile>) -> f64 {
        let trusted = self.step.as_secs_f64() * MIN_WINDOWS;
        if self.exposure_s[j] >= trusted {
            self.arrivals[j] / self.exposure_s[j]
        } else {
            pooled.map_or(0.0, |p| p.intensity(j, None))
        }
    }

    /// Calls `each(wait, expected)` for the waits worth considering up to
    /// `bound` from `now` (the ends of the steps ahead, at most
    /// [`BUCKETS`] of them, then `bound` itself), with the arrivals
    /// expected within each: the profile's count from the anchor to then,
    /// less those already come since the anchor.
    fn outlook(
        &self,
        pooled: Option<&ArrivalProfile>,
        now: Instant,
        bound: Duration,
        mut each: impl FnMut(Duration, f64),
    ) {
        let counts = Counts::new(self, pooled);
        let (s, base, late) = match self.anchor {
            // What is expected from now on: the profile's count to then,
            // less its count to now. Arrivals that came early are counted
            // off too (those clients came back): to the start of the current
            // step, where the profile cannot tell early from on time.
            Some(anchor) => {
                let s = now.saturating_duration_since(anchor);
                let base = if self.since_anchor == 0 {
                    counts.until(s)
                } else {
                    let step_start = self.step * (s.as_nanos() / self.step.as_nanos()) as u32;
                    counts.until(step_start).max(self.since_anchor as f64)
                };
                let late = if self.returns { (self.weight - self.since_anchor as f64).max(0.0) } else { 0.0 };
                (s, base, late)
            }
            // Nothing anchors it yet: the open tail is all it knows.
            None => (self.horizon(), counts.until(self.horizon()), 0.0),
        };
        // Clients answered at the anchor and not back yet are late, not
        // gone: each comes within the wait with the chance the profile
        // gives a return after `s` of coming by `s + wait` (per answer,
        // where that reads as a chance at all: open-loop traffic brings
        // more than one arrival per answer, and the count alone serves).
        let by_now = if late > 0.0 { counts.until(s) / self.weight } else { 1.0 };
        let expect = |wait: Duration| {
            let to_then = counts.until(s + wait);
            let catch_up = if by_now < 1.0 {
                let coming = to_then / self.weight - by_now;
                (late * coming / (1.0 - by_now).max(0.01)).min(late)
            } else {
                0.0
            };
            (to_then - base).max(catch_up).max(0.0)
        };
        let first = (s.as_nanos() / self.step.as_nanos()) as u32 + 1;
        for j in first..first + BUCKETS as u32 {
            let wait = self.step * j - s;
            if wait >= bound {
                break;
            }
            each(wait, expect(wait));
        }
        each(bound, expect(bound));
    }
}

/// A profile's expected arrivals from its anchor, each reading in constant
/// time: its steps are read once per outlook, which asks for the count at
/// every step ahead (the adaptive wait runs at every arrival and finish,
/// so what it costs is paid per request).
struct Counts {
    step_s: f64,
    weight: f64,
    /// Arrivals per second in each step, then the tail.
    rate: [f64; BUCKETS + 1],
    /// Arrivals expected (per unit of weight) before each step starts.
    before: [f64; BUCKETS + 1],
}

impl Counts {
    fn new(profile: &ArrivalProfile, pooled: Option<&ArrivalProfile>) -> Self {
        let step_s = profile.step.as_secs_f64();
        let rate: [f64; BUCKETS + 1] = std::array::from_fn(|j| profile.intensity(j, pooled));
        let mut sum = 0.0;
        let before = rate.map(|r| {
            let start = sum;
            sum += r * step_s;
            start
        });
        Self { step_s, weight: profile.weight, rate, before }
    }

    /// Expected arrivals from the anchor to `offset` after it.
    fn until(&self, offset: Duration) -> f64 {
        let x = offset.as_secs_f64();
        let whole = ((x / self.step_s) as usize).min(BUCKETS);
        (self.before[whole] + self.rate[whole] * (x - whole as f64 * self.step_s)) * self.weight
    }
}

/// Arrivals since the last finish that the profiles by time since the
/// last arrival tell apart; beyond, they share the last one.
pub const ARRIVAL_STATES: usize = 16;

/// The profiles the adaptive wait consults: arrivals by time since the
/// last finish (clients coming back for more), and by time since the last
/// arrival (bursts, and open-loop traffic at its rate). The latter is kept
/// apart by how many requests had arrived since the last finish (up to
/// [`ARRIVAL_STATES`]): after the fourth of four clients that take turns
/// came back, nothing more comes until the next finish, while after the
/// first, three more are on their way; one profile for both would expect
/// company after the last, and wait for nobody. Each offers its own
/// expectation; the policy takes whichever promises the better wait.
#[derive(Debug, Clone)]
pub struct Arrivals {
    after_finish: ArrivalProfile,
    /// By time since the last arrival, over all arrivals: what a state
    /// reads where its own evidence is still too thin.
    after_arrival: ArrivalProfile,
    /// The same, by arrivals since the last finish.
    by_state: Vec<ArrivalProfile>,
    /// Arrivals since the last finish.
    since_finish: usize,
    busy: Utilisation,
}

/// The share of executor time spent computing, decayed like the profiles:
/// what executor time saved by batching is worth. Near idle, the time a
/// wait saves would have gone unused anyway; near saturation, it is what
/// everyone queues for.
#[derive(Debug, Clone)]
struct Utilisation {
    last: Instant,
    /// Share of the executors computing since `last`.
    now_busy: f64,
    busy_s: f64,
    total_s: f64,
}

impl Utilisation {
    fn new(now: Instant) -> Self {
        Self { last: now, now_busy: 0.0, busy_s: 0.0, total_s: 0.0 }
    }

    fn set(&mut self, now: Instant, busy: f64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if dt > 0.0 {
            let keep = 0.5f64.powf(dt / HALF_LIFE.as_secs_f64());
            self.busy_s = self.busy_s * keep + self.now_busy * dt;
            self.total_s = self.total_s * keep + dt;
            self.last = now;
        }
        self.now_busy = busy.clamp(0.0, 1.0);
    }

    /// Busy time that was not followed live (a run on the inline lane).
    fn add(&mut self, busy_s: f64) {
        self.busy_s += busy_s;
    }

    fn ratio(&self) -> f64 {
        if self.total_s > 0.0 { self.busy_s / self.total_s } else { 0.0 }
    }
}

impl Arrivals {
    /// Profiles looking `horizon` ahead (the longest the wait may last).
    pub fn new(now: Instant, horizon: Duration) -> Self {
        Self {
            after_finish: ArrivalProfile { returns: true, ..ArrivalProfile::new(now, horizon) },
            after_arrival: ArrivalProfile::new(now, horizon),
            by_state: vec![ArrivalProfile::new(now, horizon); ARRIVAL_STATES],
            since_finish: 0,
            busy: Utilisation::new(now),
        }
    }

    /// Open-loop arrivals at a known steady rate and executors busy for
    /// `utilisation` of the time, as if measured for ever (the planner's
    /// simulator plans with this); [`busy`](Self::busy) still moves it.
    pub fn steady(rate_per_s: f64, utilisation: f64, horizon: Duration) -> Self {
        let now = Instant::now();
        let total_s = HALF_LIFE.as_secs_f64() / std::f64::consts::LN_2;
        let busy = Utilisation { last: now, now_busy: 0.0, busy_s: utilisation.clamp(0.0, 1.0) * total_s, total_s };
        Self {
            after_finish: ArrivalProfile::steady(rate_per_s, horizon),
            after_arrival: ArrivalProfile::steady(rate_per_s, horizon),
            by_state: vec![ArrivalProfile::steady(rate_per_s, horizon); ARRIVAL_STATES],
            since_finish: 0,
            busy,
        }
    }

    /// From `now`, this share of the executors is computing.
    pub fn busy(&mut self, now: Instant, share: f64) {
        self.busy.set(now, share);
    }

    /// A run of `busy` that [`busy`](Self::busy) did not follow, on one of
    /// `instances` executors.
    pub fn ran(&mut self, busy: Duration, instances: usize) {
        self.busy.add(busy.as_secs_f64() / instances.max(1) as f64);
    }

    /// The share of executor time spent computing lately.
    pub fn utilisation(&self) -> f64 {
        self.busy.ratio()
    }

    /// A request arrived at `now`.
    pub fn arrived(&mut self, now: Instant) {
        self.after_finish.arrived(now);
        self.after_arrival.arrived(now);
        self.after_arrival.anchor_at(now, 1.0);
        let last = self.state();
        self.by_state[last].arrived(now);
        self.by_state[last].release(now);
        self.since_finish += 1;
        let next = self.state();
        self.by_state[next].anchor_at(now, 1.0);
    }

    /// A batch of `answered` requests finished at `now` (its answers are
    /// about to leave).
    pub fn finished(&mut self, now: Instant, answered: usize) {
        self.after_finish.anchor_at(now, answered as f64);
        self.since_finish = 0;
    }

    /// Calls `each(wait, expected arrivals)` for the waits worth
    /// considering up to `bound` from `now`, by either profile.
    pub fn outlook(&self, now: Instant, bound: Duration, mut each: impl FnMut(Duration, f64)) {
        self.after_finish.outlook(None, now, bound, &mut each);
        self.by_state[self.state()].outlook(Some(&self.after_arrival), now, bound, &mut each);
    }

    /// Which profile by time since the last arrival follows now.
    fn state(&self) -> usize {
        self.since_finish.min(ARRIVAL_STATES - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    fn expected(profile: &ArrivalProfile, now: Instant, wait: Duration) -> f64 {
        let mut got = 0.0;
        profile.outlook(None, now, wait, |w, e| {
            if w == wait {
                got = e;
            }
        });
        got
    }

    #[test]
    fn one_client_waiting_for_each_answer_brings_no_company() {
        let t0 = Instant::now();
        let mut p = ArrivalProfile::new(t0, 2 * MS);
        // Each request arrives 0.2 ms after the answer and computes 1 ms:
        // while one is queued right after a finish, no other is expected.
        let mut t = t0;
        for _ in 0..2000 {
            t += MS;
            p.anchor_at(t, 1.0);
            t += 200 * US;
            p.arrived(t);
        }
        // Its own arrival is already counted: nothing more is coming.
        assert!(expected(&p, t, 2 * MS) < 0.05, "{}", expected(&p, t, 2 * MS));
    }

    #[test]
    fn clients_coming_back_after_a_finish_are_expected_and_then_counted_off() {
        let t0 = Instant::now();
        let mut p = ArrivalProfile::new(t0, 2 * MS);
        // Two clients, answered together, back 300 and 310 µs later.
        let mut t = t0;
        for _ in 0..2000 {
            t += 10 * MS;
            p.anchor_at(t, 1.0);
            p.arrived(t + 300 * US);
            p.arrived(t + 310 * US);
        }
        t += 10 * MS;
        p.anchor_at(t, 1.0);
        // Right after the finish, two are on their way within 0.5 ms.
        let two = expected(&p, t, 500 * US);
        assert!((two - 2.0).abs() < 0.1, "{two}");
        // Nothing is expected before they come.
        assert!(expected(&p, t, 200 * US) < 0.05);
        // Once the first came, one more is expected.
        p.arrived(t + 300 * US);
        let one = expected(&p, t + 300 * US, 200 * US);
        assert!((one - 1.0).abs() < 0.1, "{one}");
    }

    #[test]
    fn open_loop_arrivals_read_as_their_rate_past_the_horizon() {
        let t0 = Instant::now();
        let mut p = ArrivalProfile::new(t0, MS);
        // One arrival every 0.25 ms (4000/s); batches finish every 5 ms.
        let mut t = t0;
        for i in 0..40_000 {
            t += 250 * US;
            if i % 20 == 0 {
                p.anchor_at(t, 1.0);
            }
            p.arrived(t + US);
        }
        // A finish, then 4 ms of arrivals at the same rate: over the next
        // 3 ms, 4000/s brings 12.
        t += 250 * US;
        p.anchor_at(t, 1.0);
        for k in 0..16 {
            p.arrived(t + 250 * US * k + US);
        }
        let got = expected(&p, t + 4 * MS, 3 * MS);
        assert!((got - 12.0).abs() < 1.0, "{got}");
        // A steady profile says the same.
        let steady = ArrivalProfile::steady(4000.0, MS);
        let e = expected(&steady, Instant::now(), 3 * MS);
        assert!((e - 12.0).abs() < 0.01, "{e}");
    }

    /// Clients answered together every 20 ms for `rounds` rounds, each
    /// back `back(round)[i]` after its answer. Returns the last finish.
    fn taking_turns(a: &mut Arrivals, t0: Instant, rounds: usize, back: impl Fn(usize) -> Vec<Duration>) -> Instant {
        let mut t = t0;
        for round in 0..rounds {
            t += 20 * MS;
            let back = back(round);
            a.finished(t, back.len());
            for b in back {
                a.arrived(t + b);
            }
        }
        t
    }

    #[test]
    fn after_the_last_of_four_clients_came_back_nothing_more_is_expected() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(t0, 2 * MS);
        // Four clients answered together every 20 ms, back 0.6, 0.8, 1.0
        // and 1.4 ms later: after each of the first three, another comes
        // within 0.4 ms; after the fourth, none until the next finish.
        let back = [600 * US, 800 * US, 1000 * US, 1400 * US];
        let mut t = taking_turns(&mut a, t0, 500, |_| back.to_vec());
        let most = |a: &Arrivals, now: Instant| {
            let mut most = 0.0f64;
            a.outlook(now, MS, |_, e| most = most.max(e));
            most
        };
        t += 20 * MS;
        a.finished(t, 4);
        for b in &back[..3] {
            a.arrived(t + *b);
            let e = most(&a, t + *b);
            assert!(e > 0.5, "after {b:?}: {e}");
        }
        a.arrived(t + back[3]);
        let e = most(&a, t + back[3]);
        assert!(e < 0.05, "after the fourth: {e}");
    }

    #[test]
    fn a_client_late_to_come_back_is_still_expected() {
        let t0 = Instant::now();
        let mut a = Arrivals::new(t0, 4 * MS);
        // Four clients answered together every 20 ms, back 0.6-0.9 ms
        // later, the last one 1.8 ms late one time in ten.
        let mut t = taking_turns(&mut a, t0, 1000, |round| {
            let last = if round % 10 == 0 { 2700 * US } else { 900 * US };
            vec![600 * US, 700 * US, 800 * US, last]
        });
        t += 20 * MS;
        a.finished(t, 4);
        for b in [600 * US, 700 * US, 800 * US] {
            a.arrived(t + b);
        }
        // At 1.2 ms the fourth is late; most runs it came by now, but it
        // has not gone: it is expected within the next 2 ms.
        let mut within = 0.0f64;
        a.outlook(t + 1200 * US, 2 * MS, |w, e| {
            if w == 2 * MS {
                within = within.max(e);
            }
        });
        assert!(within > 0.8, "{within}");
    }

    #[test]
    fn evidence_fades_when_traffic_stops() {
        let t0 = Instant::now();
        let mut p = ArrivalProfile::new(t0, 2 * MS);
        let mut t = t0;
        for _ in 0..2000 {
            t += 10 * MS;
            p.anchor_at(t, 1.0);
            p.arrived(t + 300 * US);
        }
        // Twenty idle half-lives later, a finish: the old arrivals no longer
        // outweigh the time without them.
        t += 20 * HALF_LIFE;
        p.arrived(t);
        p.anchor_at(t, 1.0);
        assert!(expected(&p, t, 2 * MS) < 0.05);
    }
}
