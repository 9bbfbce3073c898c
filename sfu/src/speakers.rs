//! Active-speaker detection from RFC 6464 audio levels: who is speaking, loudest first,
//! changed at most every so often so a lively conversation does not flood clients. Time is an
//! argument, so it is tested without waiting.

use crate::ids::ParticipantId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Average level (−dBov: 0 is loudest, 127 silence) at or below which a participant speaks.
/// Speech sits around −20 to −45 dBov; room noise below −55.
pub const SPEAKING_LEVEL: f32 = 55.0;
/// A participant whose level has not been reported for this long is not speaking.
const STALE: Duration = Duration::from_millis(1500);
/// The list changes at most this often.
const MIN_INTERVAL: Duration = Duration::from_millis(400);
/// Weight of the newest report in the smoothed level.
const SMOOTHING: f32 = 0.5;

#[derive(Debug, Clone, Copy)]
struct Level {
    smoothed: f32,
    updated: Instant,
}

/// Tracks the room's audio levels and decides when to announce a new speaker list.
#[derive(Debug, Default)]
pub struct SpeakerDetector {
    levels: HashMap<ParticipantId, Level>,
    announced: Vec<ParticipantId>,
    announced_at: Option<Instant>,
}

impl SpeakerDetector {
    /// A participant's average level over the last report period.
    pub fn report(&mut self, participant: &ParticipantId, level: f32, now: Instant) {
        let level = level.clamp(0.0, 127.0);
        self.levels
            .entry(participant.clone())
            .and_modify(|l| {
                l.smoothed = SMOOTHING * level + (1.0 - SMOOTHING) * l.smoothed;
                l.updated = now;
            })
            .or_insert(Level {
                smoothed: level,
                updated: now,
            });
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
                l.smoothed <= SPEAKING_LEVEL && now.saturating_duration_since(l.updated) < STALE
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
    fn changes_are_debounced_and_stale_speakers_drop_out() {
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
        // Nothing reported for a while: nobody speaks.
        let t3 = t2 + Duration::from_secs(2);
        assert_eq!(d.poll(t3), Some(vec![]));
    }

    #[test]
    fn a_cough_does_not_make_a_speaker_but_speech_does() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        d.report(&id("a"), 120.0, t0);
        d.report(&id("a"), 30.0, t0 + Duration::from_millis(250));
        assert!(
            d.speakers(t0 + Duration::from_millis(250)).is_empty(),
            "smoothed: one loud report is not enough"
        );
        d.report(&id("a"), 30.0, t0 + Duration::from_millis(500));
        d.report(&id("a"), 30.0, t0 + Duration::from_millis(750));
        assert_eq!(d.speakers(t0 + Duration::from_millis(750)), vec![id("a")]);
        d.remove(&id("a"));
        assert!(d.speakers(t0 + Duration::from_millis(750)).is_empty());
    }
}
