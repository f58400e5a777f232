//! `--max-in-flight auto`: a flow-control window that tunes itself for goodput (acked/s)
//! while keeping handling latency near its uncongested level.
//!
//! The prior art is TCP Vegas and Netflix's concurrency-limits (`VegasLimit`,
//! `Gradient2Limit`): compare the latency measured now with the least latency seen, the
//! uncongested one. An RPC client moves its limit by a few requests per sample; a queue
//! consumer's window spans six orders of magnitude (a thousand to two million leases), so
//! this controller aims at a target instead, from Little's law (leases held = goodput ×
//! handling time), as Vegas' `expected = window / base RTT` does:
//!
//! ```text
//! target = goodput × base × HEADROOM    (the window that keeps the measured goodput
//!                                        flowing at the uncongested latency, with room)
//! up:   window ← min(target, 2 × window)
//! down: window ← window + SMOOTHING × (target − window), ≥ 0.9 × window
//! ```
//!
//! - **Latency.** Each sample, the mean time from task spawn to ack of the messages acked in
//!   it (`short`; not the report's handling time, see `Metrics::latency_totals`).
//!   The `base` is the least `short` seen (Vegas' base RTT); the first sample, which holds
//!   only the fastest of the first messages, is left out. The base rises only slowly (a
//!   [`BASE_RISE`] share of the gap per sample), and only on samples where less than half
//!   the window is held, where the window's own queueing cannot have raised the latency; it
//!   is reset to `short` when [`RESET_AFTER`] samples in a row stayed above [`CONGESTED`] ×
//!   base without the latency falling by a tenth: then the handlers themselves became
//!   slower, not the queue longer.
//! - **Goodput.** The mean of the last [`GOODPUT_SAMPLES`] samples' acks per second: one
//!   second's goodput is noisy (±30 % under load here), the window must not follow the noise.
//! - **Start-up**, as TCP's slow start: the window doubles each sample while the goodput
//!   keeps up (it grew by a quarter or more over the last two samples, which allows for the
//!   handling time it takes to show) and the latency stays within [`START_LATENCY_LIMIT`]
//!   (1.15) of the least read in it (as TCP's delay-based HyStart: the goodput shows a
//!   doubling a handling time late, the latency sooner); then it goes back to what the best
//!   goodput of the start-up needs at its least latency (best × least, at most half the
//!   window), and the base is measured from there. A thousand becomes a quarter of a
//!   million in about nine samples. The least is read only from samples at least
//!   [`SETTLED_SPAN`] of a handling time long: shorter ones ack only the fastest messages of
//!   each new batch and read low. (While the window grows, the first acks of each new batch
//!   are its fastest messages: no base is taken from them either.)
//! - **Below capacity** the goodput grows with the window, so the target is about
//!   `HEADROOM × window`. **At capacity** (the CPUs, or a database's connections) the goodput stops
//!   growing, and the target stops at `HEADROOM` times the window that capacity needs at the
//!   uncongested latency: the handling latency stays within about `HEADROOM` × the base.
//!   **When the downstream degrades** (fewer connections), the goodput falls and the target
//!   with it; the window comes down by at most 10 % a sample, so no single noisy sample
//!   swings it.
//! - **Probes.** Every [`PROBE_EVERY`] samples the window is held at [`PROBE_CUT`] (0.6) of
//!   itself for [`PROBE_SAMPLES`] samples, so that the base is measured there, and then
//!   goes back to where it was (BBR's ProbeRTT): a service that starts congested (a window
//!   of 1,000 where 100 would do) first reads a base that is queueing already, and would
//!   otherwise never find better.
//! - **Draining.** While more leases are held than the window (after the start-up or a cut,
//!   those of the larger window are still being handled, and their acks come in a burst),
//!   samples are skipped: a burst read as goodput would send the target far too high.
//! - **Not in use** (fewer than half of the window's leases held: the traffic, not the
//!   window, limits the goodput), the window is not grown.
//! - **Pace.** One sample per `clamp(base, 100 ms, 1 s)`: a change of the window shows in
//!   the handling times about one handling time later.
//!
//! The window stays within [`MIN_WINDOW`] and the ceiling (`--max-in-flight auto` sets it to
//! [`AUTO_CEILING`]). The controller is a plain struct fed with samples, so its tests drive
//! it deterministically; `run` feeds it from the metrics on a thread of its own.

use std::time::Duration;

/// The least window: one pull's batch of 256, so that a small window does not turn the
/// batched pulls into one lease at a time.
pub(crate) const MIN_WINDOW: usize = 256;
/// The window `--max-in-flight auto` starts from: the fixed default.
pub(crate) const START_WINDOW: usize = 1000;
/// The most `--max-in-flight auto` goes to: the largest window the bench sweeps, about
/// 1.3 GB of leases held at the memory per lease the bench measures.
pub const AUTO_CEILING: usize = 2_000_000;
/// The target's margin over the window the goodput needs at the base latency: room for the
/// spread of the latency and of the goodput.
const HEADROOM: f64 = 1.5;
/// The share of the gap to a lower target closed per sample.
const SMOOTHING: f64 = 0.5;
/// The largest cut of one sample (10 %), and the largest growth (doubling).
const STEP: (f64, f64) = (0.9, 2.0);
/// The share of the gap by which the base rises towards a higher sample.
const BASE_RISE: f64 = 0.02;
/// The latency, over the base, above which a sample counts as congested for the reset of
/// the base (above the headroom the target keeps the window at).
const CONGESTED: f64 = 2.0;
/// Congested samples in a row after which a latency that did not fall is the workload's.
const RESET_AFTER: u32 = 20;
/// Samples after a growth of the window from which the handling times are read again for
/// the base: a handling time for the new leases to finish, and one more.
const STEADY_AFTER: u64 = 2;
/// Held leases over the window above which the leases of a larger window are still being
/// handled (after the start-up, or a cut): the samples are skipped until they are settled.
const DRAINED: f64 = 1.1;
/// The latency, over the base, under which growth after the start-up uses a headroom of 2,
/// until it is first passed.
const UNCONGESTED: f64 = 1.2;
/// In start-up, the least goodput growth over two samples (two doublings) that keeps it
/// doubling.
const START_GAIN: f64 = 1.25;
/// In start-up, the latency, over the least seen in it, that ends it whatever the goodput.
const START_LATENCY_LIMIT: f64 = 1.15;
/// In start-up, a sample's length over its latency from which the latency is read for the
/// least: a shorter sample acks only the fastest messages of each new batch.
const SETTLED_SPAN: f64 = 0.75;
/// Samples between two probes of the base latency.
const PROBE_EVERY: u32 = 30;
/// The window of a probe, as a share of the window: below `1 / HEADROOM`, so that the probe
/// runs under the window the base was measured at, and a base measured with queueing in it
/// falls (by a tenth per probe). At capacity the window is 1.5 times what the goodput needs,
/// so the probe costs about a tenth of the goodput for one sample in thirty, under 1 %.
const PROBE_CUT: f64 = 0.6;
/// Samples a probe lasts: one for the change to show in the handling times, one to read it.
const PROBE_SAMPLES: u32 = 1;
/// Samples whose goodput is averaged.
const GOODPUT_SAMPLES: usize = 3;
/// Samples with fewer acks than this carry no latency signal and change nothing.
const MIN_ACKS: u64 = 10;
/// The shortest and longest time between two samples.
const PACE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// What one sample measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Messages acked during the sample.
    pub(crate) acked: u64,
    /// Their mean time from task spawn to ack.
    pub(crate) latency: Duration,
    /// The sample's length.
    pub(crate) span: Duration,
    /// Leases held at its end.
    pub(crate) in_flight: usize,
}

/// The controller's state.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    /// The window now.
    window: f64,
    /// The most it may be.
    ceiling: f64,
    /// The uncongested latency, in seconds (`None` until the second sample with acks).
    base: Option<f64>,
    /// The goodput of the last samples, newest last.
    goodput: Vec<f64>,
    /// Congested samples in a row, and the latency at the first of them.
    congested: Option<(u32, f64)>,
    /// Samples with acks taken so far.
    samples: u64,
    /// Samples since the last probe of the base.
    since_probe: u32,
    /// Samples the probe in progress still lasts.
    probing: u32,
    /// The window before the probe in progress, restored when it ends.
    before_probe: f64,
    /// Since the start-up ended, until the latency first rose a fifth over the base: the
    /// window grows back to the knee on a larger headroom.
    regrowing: bool,
    /// Whether the start-up (doubling) goes on.
    starting: bool,
    /// The sample (of `samples`) at which the window last grew: the base is read only from
    /// samples at least [`STEADY_AFTER`] later, as growth makes the handling times read low.
    grew_at: u64,
    /// The latency of the last sample, in seconds: the pace before a base is known.
    last_latency: f64,
    /// In start-up, the goodput of each sample, and the least latency seen.
    start: (Vec<f64>, f64),
}

impl Controller {
    /// A controller starting at [`START_WINDOW`] (within `ceiling`).
    pub(crate) fn new(ceiling: usize) -> Self {
        let ceiling = ceiling.max(MIN_WINDOW) as f64;
        Controller {
            window: (START_WINDOW as f64).min(ceiling),
            ceiling,
            base: None,
            goodput: Vec::with_capacity(GOODPUT_SAMPLES + 1),
            congested: None,
            samples: 0,
            since_probe: 0,
            probing: 0,
            before_probe: 0.0,
            regrowing: false,
            starting: true,
            grew_at: 0,
            last_latency: 0.0,
            start: (Vec::new(), f64::INFINITY),
        }
    }

    /// The window now.
    pub(crate) fn window(&self) -> usize {
        self.window as usize
    }

    /// How long to wait before the next sample.
    pub(crate) fn pace(&self) -> Duration {
        let base = Duration::from_secs_f64(self.base.unwrap_or(self.last_latency));
        base.clamp(PACE.0, PACE.1)
    }

    /// Takes one sample into account and returns the new window.
    pub(crate) fn sample(&mut self, sample: Sample) -> usize {
        if sample.acked < MIN_ACKS {
            return self.window();
        }
        self.samples += 1;
        let short = sample.latency.as_secs_f64().max(1e-6);
        let in_use = sample.in_flight as f64 >= self.window / 2.0;
        let latest = sample.acked as f64 / sample.span.as_secs_f64().max(1e-6);
        self.last_latency = short;
        if self.starting {
            let settled = sample.span.as_secs_f64() >= SETTLED_SPAN * short;
            return self.start_up(latest, short, in_use, settled);
        }
        if sample.in_flight as f64 > self.window * DRAINED {
            // More held than the window: the leases of a larger window (the start-up's, or
            // one before a cut) are still being handled, and their acks come in a burst that
            // says nothing of what this window carries. Wait until they are settled.
            self.goodput.clear();
            self.grew_at = self.samples;
            return self.window();
        }
        // (The samples of the start-up are all growth: none of them gives the base.)
        let steady = self.samples >= self.grew_at + STEADY_AFTER;
        let mut base = match self.base {
            Some(base) if short < base && steady => short,
            Some(base) if !in_use && steady => base + (short - base) * BASE_RISE,
            Some(base) => base,
            None if steady => short,
            None => {
                // No base yet: hold the window until one is read.
                return self.window();
            }
        };
        if short > CONGESTED * base {
            let (count, first) = self.congested.unwrap_or((0, short));
            if count + 1 >= RESET_AFTER && short >= first * 0.9 {
                // The window came down for long and the latency did not: it is the
                // handlers' own.
                base = short;
                self.congested = None;
            } else {
                self.congested = Some((count + 1, first));
            }
        } else {
            self.congested = None;
        }
        self.base = Some(base);
        // A probe holds a lower window for a few samples, so that the base is measured at it
        // (BBR's ProbeRTT): a base first read at a window that was congested already would
        // otherwise never fall.
        self.since_probe += 1;
        if self.probing > 0 {
            self.probing -= 1;
            if self.probing == 0 {
                // Back to the window before the probe (BBR's ProbeRTT does the same), rather
                // than growing from the probe's low latency: that overshot to twice what
                // the goodput needed after each probe, and the p99 with it.
                self.window = self.before_probe;
            }
            return self.window();
        }
        if self.since_probe >= PROBE_EVERY && in_use {
            self.since_probe = 0;
            self.probing = PROBE_SAMPLES;
            self.before_probe = self.window;
            self.window = (self.window * PROBE_CUT).max(MIN_WINDOW as f64);
            return self.window();
        }
        if self.goodput.len() == GOODPUT_SAMPLES {
            self.goodput.remove(0);
        }
        self.goodput.push(latest);
        let mean = self.goodput.iter().sum::<f64>() / self.goodput.len() as f64;
        // On the mean goodput of the last samples (acks come in bursts: one second's count
        // swings by a third under load): up at once (the pace already waits a handling
        // time), down half the gap at a time.
        // Back from the start-up and still clearly uncongested (the latency within a fifth
        // of the base), grow on twice what the goodput needs rather than 1.5 times: the
        // start-up lands low, and the way back to the knee should take a few samples, not
        // dozens. Once the latency has passed that, the knee is found: at capacity the
        // latency hovers about the fifth, and doubling the headroom each time it dipped
        // under it sent a window of 5,800 to 8,900 (and the p99 from 148 to 240 ms) with
        // a database of 2,000 connections.
        if short > base * UNCONGESTED {
            self.regrowing = false;
        }
        let headroom = if self.regrowing { 2.0 } else { HEADROOM };
        let target = mean * base * headroom;
        let window = if target > self.window && in_use {
            self.grew_at = self.samples;
            target.min(self.window * STEP.1)
        } else if target < self.window {
            (self.window + SMOOTHING * (target - self.window)).max(self.window * STEP.0)
        } else {
            self.window
        };
        self.window = window.clamp(MIN_WINDOW as f64, self.ceiling);
        self.window()
    }

    /// The start-up: doubles the window while the goodput keeps up; ends, halving it, when
    /// the goodput grew by less than a quarter over two doublings, or the latency rose by more
    /// than [`START_LATENCY_LIMIT`].
    /// The base is then measured afresh, at a window that is no longer growing: while it
    /// grows, the first acks of each new batch are its fastest messages, and the handling
    /// times read low.
    fn start_up(&mut self, goodput: f64, latency: f64, in_use: bool, settled: bool) -> usize {
        let (history, least) = &mut self.start;
        history.push(goodput);
        // The first sample holds only the fastest of the first messages, and a sample much
        // shorter than the handling time only the fastest of each new batch: with 1 s
        // handlers, the first samples read 0.25 s, 0.4 s and 0.6 s, a least that made the
        // true 1.05 s look swamped and ended the start-up at a sixteenth of the knee.
        if self.samples > 1 && settled {
            *least = least.min(latency);
        }
        let swamped = latency > START_LATENCY_LIMIT * *least;
        let count = history.len();
        let paying = count < 3 || goodput >= START_GAIN * history[count - 3];
        if !swamped && paying {
            if in_use {
                self.window = (self.window * STEP.1).min(self.ceiling);
            }
            return self.window();
        }
        self.starting = false;
        self.regrowing = true;
        self.grew_at = self.samples;
        // Past the knee by now (the goodput shows a doubling a handling time late): back to
        // what the best goodput needs at the least latency of the start-up, so that the
        // window lands at or below the knee, where the base is measured without queueing;
        // from there it grows to the target. (Landing at the window before the last
        // doubling instead carried the backlog of the larger window into the base: with a
        // database of 2,000 connections, a base of 265 ms for 108 ms handlers.)
        // The goodput is a handling time behind the window: while it still grew by g a
        // sample, the window already carried about g times more (with 1 s handlers, 99,500
        // acked/s at the sample that ended the start-up, 1.38 times the one before).
        let best = history.iter().copied().fold(0.0, f64::max);
        let growth = match history.as_slice() {
            [.., before, last] if *before > 0.0 => (last / before).clamp(1.0, STEP.1),
            _ => 1.0,
        };
        let landing = (best * growth * *least).min(self.window / 2.0);
        self.window = landing.clamp(MIN_WINDOW as f64, self.ceiling);
        // The start-up's least, read from settled samples only, is the base to start from:
        // waiting for a base of its own held the window at the landing for two more samples.
        if least.is_finite() {
            self.base = Some(*least);
        }
        self.window()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample of one second: `acked` acks at `latency_ms`, with `in_flight` held.
    fn sample(acked: u64, latency_ms: u64, in_flight: usize) -> Sample {
        Sample {
            acked,
            latency: Duration::from_millis(latency_ms),
            span: Duration::from_secs(1),
            in_flight,
        }
    }

    /// Drives the controller against a model of the service: handlers take `base_ms` at
    /// best, and at most `capacity` are handled a second, beyond which leases queue (the
    /// latency grows with the window). Returns the windows, one per sample.
    fn drive(
        controller: &mut Controller,
        samples: usize,
        base_ms: f64,
        capacity: f64,
    ) -> Vec<usize> {
        let mut windows = Vec::new();
        for _ in 0..samples {
            let window = controller.window() as f64;
            let goodput = (window / (base_ms / 1000.0)).min(capacity);
            let latency_ms = (window / goodput * 1000.0).max(base_ms);
            windows.push(controller.sample(sample(
                goodput as u64,
                latency_ms as u64,
                window as usize,
            )));
        }
        windows
    }

    #[test]
    fn below_capacity_the_window_about_doubles_each_sample() {
        let mut controller = Controller::new(AUTO_CEILING);
        // 1 s handlers and room for 190,000 a second (the bench's 2 CPUs).
        let windows = drive(&mut controller, 12, 1000.0, 190_000.0);
        // From a thousand to the capacity's window within eleven samples: 256,000 queues
        // (the latency rises by a third) and ends the start-up at the 128,000 before it;
        // the next sample grows it back past the capacity's window.
        assert!(windows[10] >= 190_000, "{windows:?}");
        assert!(
            windows[10..].iter().all(|w| *w <= 2 * 190_000),
            "{windows:?}"
        );
    }

    #[test]
    fn at_capacity_it_settles_without_swings_and_keeps_latency_within_the_headroom() {
        let mut controller = Controller::new(AUTO_CEILING);
        // 100 ms handlers and a database that takes 40,000 a second: 4,000 in flight suffice.
        let windows = drive(&mut controller, 100, 100.0, 40_000.0);
        // Within twice what the capacity needs, but during the probes (four samples in
        // twenty).
        let last = &windows[60..];
        let settled = last
            .iter()
            .filter(|window| (4_000..=8_100).contains(*window));
        assert!(settled.count() * 4 >= last.len() * 3, "{windows:?}");
        // Once the start-up is over, no sample cuts it by more than 10 %, but a probe.
        for pair in windows[10..].windows(2) {
            assert!(
                pair[1] as f64 >= pair[0] as f64 * PROBE_CUT - 1.0,
                "{pair:?}"
            );
        }
    }

    #[test]
    fn at_capacity_a_latency_that_dips_under_a_fifth_over_the_base_does_not_grow_it() {
        let mut controller = Controller::new(AUTO_CEILING);
        // 100 ms handlers and a database that takes 40,000 a second: 4,000 in flight do.
        drive(&mut controller, 60, 100.0, 40_000.0);
        // At capacity the latency hovers about a fifth over the base: 115 ms, then 130.
        let mut windows = Vec::new();
        for i in 0..40 {
            let window = controller.window();
            let latency_ms = if i % 2 == 0 { 115 } else { 130 };
            windows.push(controller.sample(Sample {
                acked: 4_000,
                latency: Duration::from_millis(latency_ms),
                span: Duration::from_millis(100),
                in_flight: window,
            }));
        }
        // About 1.5 times what the goodput needs, never the double.
        assert!(windows.iter().all(|w| *w <= 6_000), "{windows:?}");
    }

    #[test]
    fn it_comes_down_when_the_downstream_degrades() {
        let mut controller = Controller::new(AUTO_CEILING);
        drive(&mut controller, 60, 100.0, 40_000.0);
        // The database now takes a quarter of that.
        let windows = drive(&mut controller, 40, 100.0, 10_000.0);
        let last = *windows.last().expect("samples");
        assert!((1_000..=2_100).contains(&last), "{windows:?}");
    }

    #[test]
    fn a_start_up_is_not_ended_by_the_low_latencies_of_its_first_short_samples() {
        let mut controller = Controller::new(AUTO_CEILING);
        // Read off a run of 1 s handlers: each sample lasts the latency of the one before
        // (the pace), so until the pace reaches the handling time only the fastest of each
        // new batch are acked, and the latencies read low: (ms of the sample, acked, mean
        // handling ms).
        let trace = [
            (100, 10, 252),
            (252, 54, 420),
            (420, 397, 642),
            (642, 2_298, 921),
            (921, 8_266, 1_045),
            (1_000, 18_791, 1_080),
        ];
        let mut window = START_WINDOW;
        for (span, acked, latency) in trace {
            window = controller.sample(Sample {
                acked,
                latency: Duration::from_millis(latency),
                span: Duration::from_millis(span),
                in_flight: window,
            });
        }
        // Still doubling: 1,080 ms is not 2.5 times the least latency of a settled sample.
        assert_eq!(window, 64 * START_WINDOW);
        assert!(controller.starting);
    }

    #[test]
    fn a_window_that_is_not_in_use_is_not_grown() {
        let mut controller = Controller::new(AUTO_CEILING);
        controller.sample(sample(100, 1000, 10));
        let window = controller.sample(sample(100_000, 1000, 10));
        assert_eq!(window, START_WINDOW);
    }

    #[test]
    fn handlers_that_became_slower_are_followed_after_a_while() {
        let mut controller = Controller::new(AUTO_CEILING);
        drive(&mut controller, 30, 100.0, 40_000.0);
        // Every handler now takes five times as long, whatever the window: the window comes
        // down at first (the goodput fell), then the new latency becomes the base and the
        // window grows back to what the capacity needs at it.
        let windows = drive(&mut controller, 80, 500.0, 40_000.0);
        let last = *windows.last().expect("samples");
        assert!(last >= 20_000, "{windows:?}");
    }

    #[test]
    fn the_window_stays_within_its_bounds() {
        let mut controller = Controller::new(5_000);
        let windows = drive(&mut controller, 20, 100.0, 1_000_000.0);
        assert_eq!(*windows.last().expect("samples"), 5_000);
        let mut controller = Controller::new(AUTO_CEILING);
        // Ten a second at most: a window of 2 would do; probing stops at the floor of 256,
        // and the window stays at twice that.
        let windows = drive(&mut controller, 1500, 100.0, 10.0);
        assert!(
            windows[1400..]
                .iter()
                .all(|window| *window <= 2 * MIN_WINDOW),
            "{windows:?}"
        );
        assert!(windows.contains(&MIN_WINDOW), "{windows:?}");
    }

    #[test]
    fn the_pace_follows_the_base_latency() {
        let mut controller = Controller::new(AUTO_CEILING);
        assert_eq!(controller.pace(), PACE.0);
        controller.starting = false;
        controller.sample(sample(1000, 400, 1000));
        controller.sample(sample(1000, 400, 1000));
        assert_eq!(controller.pace(), Duration::from_millis(400));
        controller.sample(sample(1000, 50, 100));
        assert_eq!(controller.pace(), PACE.0);
    }
}
