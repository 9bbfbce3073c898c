//! What the browser tests share about the call page: a person in the call (their window and
//! participant id), how to find someone's tile, and how to tell that a tile's video really
//! moves (its `framesDecoded` rising, read through the page's `sfuTest.stats()` hook).

#![allow(dead_code)] // each browser test binary uses its own part of this

use crate::cdp::{Browser, CdpError, Page};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Long enough for a cold Chromium and a debug-build server sharing 2 cores; every wait ends
/// as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(20);
/// Decoded frames that must be added after the first one before video counts as moving
/// (under a second at any of the sources' 15–30 fps).
pub const FRAMES_THAT_PROVE_MOTION: u64 = 10;

pub type Result<T> = std::result::Result<T, CdpError>;

pub fn fail<T>(message: String) -> Result<T> {
    Err(CdpError(message))
}

/// Runs one part of a test's story, naming it in the error and printing how long it took.
pub async fn step<T>(name: &str, part: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let outcome = part.await.map_err(|e| CdpError(format!("{name}: {e}")));
    println!("{name}: {:.1?}", started.elapsed());
    outcome
}

/// One person in the call: their browser window and the id the server gave them.
pub struct Person {
    pub page: Page,
    pub id: String,
}

impl Person {
    /// Opens `/?room=..&name=..` (the shareable link) and waits until the server has let them in.
    pub async fn join(browser: &Browser, base: &str, room: &str, name: &str) -> Result<Person> {
        Self::join_at(browser, name, &format!("{base}/?room={room}&name={name}")).await
    }

    /// Opens `url`, a link that joins at once, and waits until the server has let them in.
    pub async fn join_at(browser: &Browser, name: &str, url: &str) -> Result<Person> {
        let page = browser.open(name, url).await?;
        let id = page
            .wait_for(
                "sfuTest.state().joined && sfuTest.state().participantId",
                WAIT,
                "joining the room",
            )
            .await?;
        let id = id.as_str().unwrap_or_default().to_owned();
        Ok(Person { page, id })
    }

    /// Clicks the screen-share button and waits until the page says it is sharing.
    pub async fn start_screen_share(&self) -> Result<()> {
        self.page.click("#share-screen").await?;
        self.page
            .wait_for(
                "sfuTest.state().publishing.screen",
                WAIT,
                "the screen share to start",
            )
            .await
            .map(drop)
    }
}

/// Someone in the room as the pages know them: tiles and stats are keyed by participant id,
/// and labelled with the name.
pub trait InTheRoom {
    fn id(&self) -> &str;
    fn name(&self) -> &str;
}

impl InTheRoom for Person {
    fn id(&self) -> &str {
        &self.id
    }

    fn name(&self) -> &str {
        &self.page.label
    }
}

/// A CSS selector for `who`'s tile of `kind` ("camera" or "screen") on someone else's page.
pub fn tile_selector(who: &impl InTheRoom, kind: &str) -> String {
    format!(
        "#grid .tile[data-local='false'][data-participant-id='{}'][data-kind='{kind}']",
        who.id()
    )
}

/// A JavaScript string literal.
pub fn js(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// An expression for `viewer`'s stats entry of `sender`'s `kind` tile once it has decoded
/// more than `min_frames` frames of a known size (null until then).
pub fn stats_entry(sender: &impl InTheRoom, kind: &str, min_frames: u64) -> String {
    format!(
        "sfuTest.stats().then(list => list.find(s => s.participant_id === {id} && \
         s.kind === {kind} && s.framesDecoded > {min_frames} && s.frameWidth > 0) ?? null)",
        id = js(sender.id()),
        kind = js(kind),
    )
}

/// Waits until `viewer` decodes moving video from `sender`'s `kind` tile: `framesDecoded`
/// rises by a clear margin, the frame has a size, and the tile shows it live.
/// Returns the last stats entry.
pub async fn wait_for_moving_video(
    viewer: &Person,
    sender: &impl InTheRoom,
    kind: &str,
) -> Result<Value> {
    let what = format!("{}'s {kind} video to decode", sender.name());
    let first = viewer
        .page
        .wait_for(&stats_entry(sender, kind, 0), WAIT, &what)
        .await?;
    let first_count = first["framesDecoded"].as_u64().unwrap_or_default();
    let what = format!(
        "{}'s {kind} video to keep decoding (from {first_count} frames)",
        sender.name()
    );
    let later = viewer
        .page
        .wait_for(
            &stats_entry(sender, kind, first_count + FRAMES_THAT_PROVE_MOTION),
            WAIT,
            &what,
        )
        .await?;
    let selector = js(&tile_selector(sender, kind));
    viewer
        .page
        .wait_for(
            &format!("document.querySelector({selector})?.dataset.status === 'live'"),
            WAIT,
            &format!("{}'s {kind} tile to show live video", sender.name()),
        )
        .await?;
    Ok(later)
}

/// Waits until `viewer`'s page has no tile of `kind` for `sender`.
pub async fn wait_for_no_tile(viewer: &Person, sender: &impl InTheRoom, kind: &str) -> Result<()> {
    let selector = js(&tile_selector(sender, kind));
    viewer
        .page
        .wait_for(
            &format!("document.querySelector({selector}) === null"),
            WAIT,
            &format!("{}'s {kind} tile to disappear", sender.name()),
        )
        .await
        .map(drop)
}
