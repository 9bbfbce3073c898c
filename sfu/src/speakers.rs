//! Active-speaker detection from RFC 6464 audio levels: who is speaking, loudest first,
//! changed at most every so often so a lively conversation does not flood clients. A
//! participant speaks while a loud report came within the last second (the pauses between
//! words must not make the highlight flicker). Time is an argument, so it is tested without
//! waiting.

use crate::ids::ParticipantId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Loudest level of a report period (−dBov: 0 is loudest, 127 silence) at or below which the
/// period counts as speech. Speech peaks around −10 to −35 dBov; room noise stays below −50.
pub const SPEAKING_LEVEL: f32 = 45.0;
/// A participant stays a speaker this long after its last loud report.
const HANGOVER: Duration = Duration::from_millis(1000);
/// The list changes at most this often.
const MIN_INTERVAL: Duration = Duration::from_millis(400);
/// Weight of the newest report in the smoothed level.
const SMOOTHING: f32 = 0.5;

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Smoothed loudness of the loud reports, for ordering speakers.
    smoothed: f32,
    /// When the last loud report came.
    last_loud: Option<Instant>,
}

/// Tracks the room's audio levels and decides when to announce a new speaker list.
#[derive(Debug, Default)]
pub struct SpeakerDetector {
    levels: HashMap<ParticipantId, Level>,
    announced: Vec<ParticipantId>,
    announced_at: Option<Instant>,
}

impl SpeakerDetector {
    /// A participant's loudest level over the last report period.
    pub fn report(&mut self, participant: &ParticipantId, level: f32, now: Instant) {
        let level = level.clamp(0.0, 127.0);
        let entry = self.levels.entry(participant.clone()).or_insert(Level {
            smoothed: level,
            last_loud: None,
        });
        if level <= SPEAKING_LEVEL {
            entry.smoothed = if entry.last_loud.is_some() {
                SMOOTHING * level + (1.0 - SMOOTHING) * entry.smoothed
            } else {
                level
            };
            entry.last_loud = Some(now);
        }
    }

    /// The participant left or muted its microphone.
    pub fn remove(&mut self, participant: &ParticipantId) {
        self.levels.remove(participant);
    }

    /// Who speaks now, loudest first.
    pub fn speakers(&self, now: Instant) -> Vec<ParticipantId> {
        let mut speaking: Vec<(&ParticipantId, f32)> = self
            .levels
            .iter()
            .filter(|(_, l)| {
                l.last_loud
                    .is_some_and(|at| now.saturating_duration_since(at) < HANGOVER)
            })
            .map(|(id, l)| (id, l.smoothed))
            .collect();
        speaking.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)));
        speaking.into_iter().map(|(id, _)| id.clone()).collect()
    }

    /// The list to announce, if it changed and the last announcement is old enough.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<ParticipantId>> {
        let current = self.speakers(now);
        if current == self.announced {
            return None;
        }
        if self
            .announced_at
            .is_some_and(|at| now.saturating_duration_since(at) < MIN_INTERVAL)
        {
            return None;
        }
        self.announced = current.clone();
        self.announced_at = Some(now);
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ParticipantId {
        ParticipantId::new(s)
    }

    #[test]
    fn loudest_first_and_silence_is_not_speech() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        d.report(&id("quiet"), 120.0, t0);
        d.report(&id("soft"), 45.0, t0);
        d.report(&id("loud"), 20.0, t0);
        assert_eq!(d.poll(t0), Some(vec![id("loud"), id("soft")]));
        assert_eq!(d.poll(t0), None, "only sent on change");
    }

    #[test]
    fn changes_are_debounced_and_quiet_speakers_drop_out_after_the_hangover() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        d.report(&id("a"), 30.0, t0);
        assert_eq!(d.poll(t0), Some(vec![id("a")]));
        let t1 = t0 + Duration::from_millis(100);
        d.report(&id("b"), 10.0, t1);
        assert_eq!(d.poll(t1), None, "too soon after the last change");
        let t2 = t0 + Duration::from_millis(450);
        d.report(&id("a"), 30.0, t2);
        d.report(&id("b"), 10.0, t2);
        assert_eq!(d.poll(t2), Some(vec![id("b"), id("a")]));
        // Quiet reports keep the speaker through a pause, then it drops out.
        let t3 = t2 + Duration::from_millis(600);
        d.report(&id("a"), 120.0, t3);
        d.report(&id("b"), 120.0, t3);
        assert_eq!(d.speakers(t3), vec![id("b"), id("a")]);
        let t4 = t2 + Duration::from_millis(1100);
        assert_eq!(d.poll(t4), Some(vec![]));
    }

    #[test]
    fn a_beep_a_second_keeps_its_speaker_active() {
        // Chromium's fake microphone: ~100 ms at −20 dBov once a second, −90 dBov between.
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        for tick in 0..16u64 {
            let level = if tick % 4 == 0 { 20.0 } else { 90.0 };
            let now = t0 + Duration::from_millis(tick * 250);
            d.report(&id("beeper"), level, now);
            assert_eq!(d.speakers(now), vec![id("beeper")], "at {tick}");
        }
    }

    #[test]
    fn background_noise_is_not_speech() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        for tick in 0..8u64 {
            d.report(&id("fan"), 60.0, t0 + Duration::from_millis(tick * 250));
        }
        assert!(d.speakers(t0 + Duration::from_secs(2)).is_empty());
        d.remove(&id("fan"));
    }
}
