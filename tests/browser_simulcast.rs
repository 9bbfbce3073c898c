//! Simulcast on the call page, in real headless Chromium against the real server: by default
//! a page sends its camera as three layers (rids q, h, f: 320, 640 and 1280 pixels wide from
//! the fake 1280×720 camera), the server announces the track as simulcast, and each page asks
//! for the layer each tile needs: the quality forced by the test hook, `high` for an enlarged
//! (focused) tile and `low` for the strip of small tiles beside it, and in the plain grid the
//! quality for the tile's width. What the pages decode is checked against that: a tile at `low`
//! decodes exactly the smallest layer, the enlarged tile a larger picture than the strip's, no
//! tile a layer larger than it asked for, and the video keeps decoding through every change
//! (no freeze), including a screen share starting and stopping, which renegotiates the
//! publisher's connection. Last, the active-speaker highlight: with one microphone on (the
//! fake one beeps), the others' pages mark that person's tile, and the mark follows the turn.
//!
//! Sizes are measured, not assumed: `frameWidth` and `framesDecoded` come from the subscriber
//! connection's getStats through the page's `sfuTest.stats()` hook, the layers' sizes from the
//! publisher's through `sfuTest.sendStats()`.

#[path = "browser/call_page.rs"]
mod call_page;
#[path = "browser/cdp.rs"]
mod cdp;
mod common;

use call_page::{
    fail, js, stats_entry, step, tile_selector, wait_for_moving_video, wait_for_no_tile, InTheRoom,
    Person, Result, FRAMES_THAT_PROVE_MOTION, WAIT,
};
use cdp::Browser;
use common::{http_get, start_server};
use signaling::Server;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const ROOM: &str = "simulcast";
/// Big enough for the desktop layout: a 3-person grid of two columns beside the open chat,
/// whose tiles (about 460 pixels wide) want the middle layer.
const CHROMIUM_FLAGS: &[&str] = &["--window-size=1280,800"];
/// A switched-to layer starts at its next keyframe, which the server requests at once; after
/// that the video must keep decoding. Both within this long, or the switch counts as a freeze.
const SWITCH_WAIT: Duration = Duration::from_secs(5);
/// A step up to a larger layer may also wait for the publisher's encoder to resume it (Chromium
/// pauses layers its uplink estimate cannot carry, as during a screen share).
const UPGRADE_WAIT: Duration = Duration::from_secs(30);

/// Where the test saves what a page with an enlarged tile looks like.
fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-simulcast/enlarged-tile.png")
}

/// Where a failing run leaves a screenshot of every page.
fn failure_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-simulcast/failure")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_layers_follow_what_each_tile_needs() {
    let Some(chromium) = cdp::chromium_or_skip() else {
        return;
    };
    // Layers here follow tile sizes alone. Three Chromiums encoding and decoding simulcast
    // saturate 2 cores, and Chromium's receive-side estimate (REMB) reads the CPU's delays as
    // congestion, which with adaptation on keeps every tile on its smallest layer for tens of
    // seconds (README, "What adapts, and how"). The REMB governor has its own unit tests.
    let server = start_server(&["--bandwidth-adaptation", "false"]).await;
    let browser = Browser::launch(&chromium, CHROMIUM_FLAGS)
        .await
        .unwrap_or_else(|e| panic!("Chromium did not start: {e}"));
    let outcome = simulcast_call(&browser, &server).await;
    if let Err(e) = outcome {
        let screenshots = browser.screenshot_every_page(&failure_dir()).await;
        let forwarding = forwarding_report(&server).await;
        let stderr = browser.stderr_tail();
        browser.close().await;
        panic!(
            "{e}\n--- what the server forwarded and dropped ---\n{forwarding}\n\
             --- what each page showed ---\n{screenshots}\n\
             --- Chromium's last stderr lines ---\n{stderr}"
        );
    }
    browser.close().await;
    server.shutdown(Duration::from_secs(5)).await;
}

/// The three layers' nominal widths (the capture scaled by 4, 2 and 1, as the page asks), for
/// the qualities that name them.
#[derive(Debug, Clone, Copy)]
struct LayerWidths {
    low: u64,
    medium: u64,
    high: u64,
}

impl LayerWidths {
    /// The widest picture a tile at `quality` may receive.
    fn cap(&self, quality: &str) -> u64 {
        match quality {
            "low" => self.low,
            "medium" => self.medium,
            _ => self.high,
        }
    }
}

async fn simulcast_call(browser: &Browser, server: &Server) -> Result<()> {
    let base = format!("http://{}", server.addr);
    let (ada, bob, cy) = step("three people join through the plain link", async {
        let join = |name: &'static str| Person::join(browser, &base, ROOM, name);
        Ok((join("Ada").await?, join("Bob").await?, join("Cy").await?))
    })
    .await?;
    step("everyone sees the others' moving video", async {
        for (viewer, sender) in [
            (&ada, &bob),
            (&ada, &cy),
            (&bob, &ada),
            (&bob, &cy),
            (&cy, &ada),
            (&cy, &bob),
        ] {
            wait_for_moving_video(viewer, sender, "camera").await?;
        }
        Ok(())
    })
    .await?;
    let layers = step(
        "Ada's camera goes out as three layers, announced as simulcast",
        three_layers_announced(&ada, &bob),
    )
    .await?;
    step(
        "a page at low decodes the smallest layer",
        low_gets_the_smallest_layer(&bob, &ada, layers),
    )
    .await?;
    step(
        "an enlarged tile gets a larger picture than the strip's smallest layer",
        focus_follows_clicks(&bob, &ada, &cy, layers),
    )
    .await?;
    step(
        "in the grid each tile asks for the quality its width needs",
        grid_tiles_follow_their_size(&bob, &[&ada, &cy], layers),
    )
    .await?;
    step(
        "Ada's camera keeps decoding through her screen share and its end",
        camera_survives_a_screen_share(&ada, &[&bob, &cy]),
    )
    .await?;
    step(
        "the others' pages highlight whoever speaks",
        speaker_is_highlighted([&ada, &bob, &cy]),
    )
    .await?;
    Ok(())
}

/// Waits until `publisher` sends its camera as the three rids q, h and f, the first two
/// encoding at a quarter and half of the 1280×720 capture (the third too, once the publisher's
/// bandwidth estimate allows it: Chromium pauses the layers its uplink estimate cannot carry,
/// and reports a paused layer 0 pixels wide), and checks that `viewer` was told the track is
/// simulcast.
async fn three_layers_announced(publisher: &Person, viewer: &Person) -> Result<LayerWidths> {
    let sent = publisher
        .page
        .wait_for(
            "sfuTest.sendStats().then(s => { \
               const by = Object.fromEntries(s.video.filter(e => e.rid).map(e => [e.rid, e])); \
               return by.q?.frameWidth > 0 && by.h?.frameWidth > 0 && by.f ? s : null; })",
            WAIT,
            "the camera's layers q and h to be encoded (and f to exist)",
        )
        .await?;
    let capture = (
        sent["camera"]["width"].as_u64().unwrap_or_default(),
        sent["camera"]["height"].as_u64().unwrap_or_default(),
    );
    if capture != (1280, 720) {
        return fail(format!(
            "the camera captures {capture:?}, not the 1280×720 asked for"
        ));
    }
    let layers = LayerWidths {
        low: capture.0 / 4,
        medium: capture.0 / 2,
        high: capture.0,
    };
    let width_of = |rid: &str| {
        sent["video"]
            .as_array()
            .and_then(|list| list.iter().find(|e| e["rid"] == rid))
            .and_then(|e| e["frameWidth"].as_u64())
            .unwrap_or_default()
    };
    let widths = (width_of("q"), width_of("h"), width_of("f"));
    println!("Ada's layers q, h, f are {widths:?} pixels wide (0: not sent yet)");
    if widths.0 != layers.low || widths.1 != layers.medium || ![0, layers.high].contains(&widths.2)
    {
        return fail(format!(
            "the layers q, h, f are {widths:?} pixels wide, not {layers:?}; sent: {sent}"
        ));
    }
    let announced = viewer
        .page
        .eval(&format!(
            "sfuTest.state().tracks[{id}]?.find(t => t.role === 'camera') ?? null",
            id = js(publisher.id())
        ))
        .await?;
    if announced["simulcast"] != true {
        return fail(format!(
            "{} was told about {}'s camera as {announced}, not as a simulcast track",
            viewer.name(),
            publisher.name()
        ));
    }
    Ok(layers)
}

/// The test hook forces a quality for `sender`'s camera on `viewer`'s page (None: the tile's
/// own choice again).
async fn force_quality(viewer: &Person, sender: &Person, quality: Option<&str>) -> Result<()> {
    let quality = quality.map_or("null".to_owned(), js);
    viewer
        .page
        .eval(&format!(
            "sfuTest.setQuality({id}, {quality})",
            id = js(sender.id())
        ))
        .await
        .map(drop)
}

/// Waits until `viewer` has asked for `quality` for `sender`'s camera and decodes it between
/// `min_width` and `max_width` pixels wide, then checks that it keeps decoding: all within
/// `within` of `since`. Returns the width and how long it took.
async fn decodes_within(
    viewer: &Person,
    sender: &Person,
    quality: &str,
    (min_width, max_width): (u64, u64),
    since: Instant,
    within: Duration,
) -> Result<(u64, Duration)> {
    let condition = format!(
        "sfuTest.stats().then(list => list.find(s => s.participant_id === {id} && \
         s.kind === 'camera' && s.quality === {quality} && s.frameWidth >= {min_width} && \
         s.frameWidth <= {max_width}) ?? null)",
        id = js(sender.id()),
        quality = js(quality),
    );
    let what = format!(
        "{}'s camera at {quality}, {min_width} to {max_width} pixels wide, on {}'s page",
        sender.name(),
        viewer.name()
    );
    let wait = within.saturating_sub(since.elapsed());
    let entry = match viewer.page.wait_for(&condition, wait, &what).await {
        Ok(entry) => entry,
        Err(e) => return fail(frozen(e, viewer, sender).await),
    };
    let took = since.elapsed();
    let width = entry["frameWidth"].as_u64().unwrap_or_default();
    let frames = entry["framesDecoded"].as_u64().unwrap_or_default();
    let what = format!(
        "{}'s camera to keep decoding at {quality} (from {frames} frames)",
        sender.name()
    );
    let rest = within.saturating_sub(took).max(Duration::from_secs(2));
    let moving = viewer
        .page
        .wait_for(
            &stats_entry(sender, "camera", frames + FRAMES_THAT_PROVE_MOTION),
            rest,
            &what,
        )
        .await;
    if let Err(e) = moving {
        return fail(frozen(e, viewer, sender).await);
    }
    Ok((width, took))
}

/// Why `sender`'s camera may look frozen on `viewer`'s page: what the viewer receives and
/// decodes (loss, its repair, keyframes) and what the sender encodes, each twice a second apart.
async fn frozen(error: impl std::fmt::Display, viewer: &Person, sender: &Person) -> String {
    let mut lines = vec![error.to_string()];
    let entry = format!(
        "sfuTest.stats().then(list => list.find(s => s.participant_id === {id} && \
         s.kind === 'camera') ?? null)",
        id = js(sender.id())
    );
    for _ in 0..2 {
        lines.push(match viewer.page.eval(&entry).await {
            Ok(entry) => format!("{} receives {entry}", viewer.name()),
            Err(e) => format!("{}'s receive stats: {e}", viewer.name()),
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    lines.push(publisher_report(sender).await);
    lines.join("\n")
}

/// The server's forwarding counters (packets in, out and dropped by reason), from `/metrics`.
async fn forwarding_report(server: &Server) -> String {
    let body = http_get(server, "/metrics").await;
    body.lines()
        .filter(|line| line.starts_with("sfu_") && !line.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `publisher` encodes, twice a second apart: tells a frozen picture whose encoder
/// stopped from one the server stopped forwarding.
async fn publisher_report(publisher: &Person) -> String {
    let mut lines = Vec::new();
    for _ in 0..2 {
        let sent = publisher.page.eval("sfuTest.sendStats()").await;
        lines.push(match sent {
            Ok(sent) => format!("{} sends {sent}", publisher.name()),
            Err(e) => format!("{}'s send stats: {e}", publisher.name()),
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    lines.join("\n")
}

/// Bob forces Ada's camera to `low`: he decodes exactly the smallest layer, still moving.
async fn low_gets_the_smallest_layer(
    viewer: &Person,
    sender: &Person,
    layers: LayerWidths,
) -> Result<()> {
    let started = Instant::now();
    force_quality(viewer, sender, Some("low")).await?;
    let exactly_low = (layers.low, layers.low);
    let (_, took) =
        decodes_within(viewer, sender, "low", exactly_low, started, SWITCH_WAIT).await?;
    println!(
        "at low {} decodes {} pixels wide after {took:.1?}",
        viewer.name(),
        layers.low
    );
    force_quality(viewer, sender, None).await
}

/// The width of `sender`'s camera tile on `viewer`'s page, in CSS pixels.
async fn tile_width(viewer: &Person, sender: &Person) -> Result<f64> {
    let selector = js(&tile_selector(sender, "camera"));
    let width = viewer
        .page
        .eval(&format!(
            "document.querySelector({selector})?.getBoundingClientRect().width ?? 0"
        ))
        .await?;
    Ok(width.as_f64().unwrap_or_default())
}

/// On `viewer`'s page, clicking a tile enlarges it: it asks for `high` and decodes a larger
/// layer than the smallest, while every other tile, now small in the strip, asks for `low` and
/// decodes exactly the smallest layer. Clicking the other tile moves the focus: the newly
/// enlarged tile asks for `high` and the other drops to exactly the smallest layer; a second
/// click on it restores the grid.
async fn focus_follows_clicks(
    viewer: &Person,
    first: &Person,
    second: &Person,
    layers: LayerWidths,
) -> Result<()> {
    for (focused, other) in [(first, second), (second, first)] {
        let started = Instant::now();
        viewer.page.click(&tile_selector(focused, "camera")).await?;
        let selector = js(&tile_selector(focused, "camera"));
        viewer
            .page
            .wait_for(
                &format!("document.querySelector({selector})?.dataset.focused === 'true'"),
                WAIT,
                &format!("{}'s tile to be enlarged", focused.name()),
            )
            .await?;
        let (big, small) = (
            tile_width(viewer, focused).await?,
            tile_width(viewer, other).await?,
        );
        if big <= 2.0 * small {
            return fail(format!(
                "the enlarged tile is {big} pixels wide and the strip's {small}: not enlarged"
            ));
        }
        let min_width = layers.medium;
        let (high, high_took) = decodes_within(
            viewer,
            focused,
            "high",
            (min_width, layers.high),
            started,
            UPGRADE_WAIT,
        )
        .await?;
        let exactly_low = (layers.low, layers.low);
        let (low, low_took) =
            decodes_within(viewer, other, "low", exactly_low, started, UPGRADE_WAIT).await?;
        println!(
            "focus on {}: its {big:.0} px tile asks for high and decodes {high} px \
             ({high_took:.1?}); {}'s {small:.0} px tile decodes {low} px ({low_took:.1?})",
            focused.name(),
            other.name()
        );
        if high <= low {
            return fail(format!(
                "the enlarged tile decodes {high} pixels wide, the strip's {low}: not larger"
            ));
        }
        if focused.id == first.id {
            let path = screenshot_path();
            viewer.page.screenshot(&path).await?;
            println!("screenshot of an enlarged tile: {}", path.display());
        }
    }
    viewer.page.click(&tile_selector(second, "camera")).await?;
    viewer
        .page
        .wait_for(
            "document.getElementById('grid').dataset.focus === 'false'",
            WAIT,
            "the grid to come back",
        )
        .await
        .map(drop)
}

/// In the plain grid, each remote tile asks for the quality its width in device pixels needs
/// (up to 360: low, up to 720: medium, above: high; quality.js), decodes no larger layer than
/// that, and keeps decoding.
async fn grid_tiles_follow_their_size(
    viewer: &Person,
    senders: &[&Person],
    layers: LayerWidths,
) -> Result<()> {
    let scale = viewer
        .page
        .eval("window.devicePixelRatio")
        .await?
        .as_f64()
        .unwrap_or(1.0);
    for sender in senders {
        let started = Instant::now();
        let width = tile_width(viewer, sender).await? * scale;
        let quality = match width {
            w if w <= 360.0 => "low",
            w if w <= 720.0 => "medium",
            _ => "high",
        };
        let within_cap = (layers.low, layers.cap(quality));
        let (decoded, took) =
            decodes_within(viewer, sender, quality, within_cap, started, SWITCH_WAIT).await?;
        println!(
            "{}'s tile, {width:.0} device pixels wide, asks for {quality} and decodes \
             {decoded} px ({took:.1?})",
            sender.name()
        );
    }
    Ok(())
}

/// `sharer` starts a screen share and then stops it. Each renegotiates their publisher
/// connection, after which webrtc-rs knows the camera's layers only by their rid header
/// extension again; the camera must keep decoding on every viewer's page through both, checked
/// once the renegotiation is visible there (the share's tile has appeared, then gone).
async fn camera_survives_a_screen_share(sharer: &Person, viewers: &[&Person]) -> Result<()> {
    sharer.start_screen_share().await?;
    for viewer in viewers {
        wait_for_moving_video(viewer, sharer, "screen").await?;
        keeps_decoding(viewer, sharer, "after the share started").await?;
    }
    sharer.page.click("#share-screen").await?;
    for viewer in viewers {
        wait_for_no_tile(viewer, sharer, "screen").await?;
        keeps_decoding(viewer, sharer, "after the share stopped").await?;
    }
    Ok(())
}

/// `sender`'s camera decodes more frames on `viewer`'s page from now on; a failure says when.
async fn keeps_decoding(viewer: &Person, sender: &Person, when: &str) -> Result<()> {
    match wait_for_moving_video(viewer, sender, "camera").await {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = format!(
                "{}'s camera froze on {}'s page {when}: {e}",
                sender.name(),
                viewer.name()
            );
            fail(frozen(e, viewer, sender).await)
        }
    }
}

/// Chromium's fake microphone beeps about once a second, loud enough to count as speech. With
/// only one person's microphone on, the other two pages mark that person's tile as speaking
/// (and no other tile); when the turn passes, the mark follows. Everyone's microphone is back
/// on at the end.
async fn speaker_is_highlighted(everyone: [&Person; 3]) -> Result<()> {
    let [first, second, third] = everyone;
    third.page.click("#mute-mic").await?;
    second.page.click("#mute-mic").await?;
    only_tile_speaking(first, [second, third]).await?;
    first.page.click("#mute-mic").await?;
    second.page.click("#mute-mic").await?;
    only_tile_speaking(second, [first, third]).await?;
    first.page.click("#mute-mic").await?;
    third.page.click("#mute-mic").await?;
    for person in everyone {
        person
            .page
            .wait_for(
                "!sfuTest.state().muted.mic",
                WAIT,
                "the microphone to be on again",
            )
            .await?;
    }
    Ok(())
}

/// Waits until `speaker`'s camera tile is the only tile marked as speaking on each viewer's page.
async fn only_tile_speaking(speaker: &Person, viewers: [&Person; 2]) -> Result<()> {
    for viewer in viewers {
        let started = Instant::now();
        viewer
            .page
            .wait_for(
                &format!(
                    "(() => {{ const marked = [...document.querySelectorAll(\
                     '#grid .tile[data-speaking=\"true\"]')]; \
                     return marked.length === 1 && marked[0].matches({selector}); }})()",
                    selector = js(&tile_selector(speaker, "camera")),
                ),
                WAIT,
                &format!("only {}'s tile to be marked as speaking", speaker.name()),
            )
            .await?;
        println!(
            "{}'s page marks {} as speaking after {:.1?}",
            viewer.name(),
            speaker.name(),
            started.elapsed()
        );
    }
    Ok(())
}
