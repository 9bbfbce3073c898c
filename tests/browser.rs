//! The call page in real headless Chromium against the real server, checked the way people
//! use it: three people open the room's link and each sees the other two's live video (cameras
//! go out as simulcast layers by default, as one layer from a `?simulcast=0` link); chat
//! reaches everyone; muting shows on the others' tiles and video comes back on unmute; a screen
//! share appears as its own tile (also for someone who joins while it runs); leaving removes
//! the leaver's tile and rejoining from the form brings it back; a headless client from
//! `client/` publishing a real VP8 clip plays on every page; and after a server restart every
//! page rejoins by itself. One Chromium (a window per person) and one in-process server,
//! everything on 127.0.0.1.
//!
//! Chromium's fake camera draws a moving pattern, so "live video" is measured, not assumed:
//! the page's `sfuTest.stats()` hook reads `framesDecoded` from the subscriber connection's
//! getStats, and the test waits for it to rise. Without Chromium the test fails and says how
//! to install it; `SFU_SKIP_BROWSER_TESTS=1` skips it knowingly.

#[path = "browser/call_page.rs"]
mod call_page;
#[path = "browser/cdp.rs"]
mod cdp;
mod common;

use call_page::{
    fail, js, step, tile_selector, wait_for_moving_video, wait_for_no_tile, InTheRoom, Person,
    Result, WAIT,
};
use cdp::{Browser, CdpError};
use clap::Parser;
use client::{HeadlessPeer, PeerConfig};
use common::start_server;
use signaling::config::ServerConfig;
use signaling::Server;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOM: &str = "browser-call";

/// Flags on top of the driver's own (headless, fake devices, loopback ICE): windows big enough
/// for the desktop layout (chat panel open). Screen sharing needs nothing more: with
/// `--use-fake-ui-for-media-stream` the share picker is accepted at once, and
/// `--use-fake-device-for-media-stream` makes `getDisplayMedia` capture a fake "monitor"
/// (800×450 at 15 fps, the same moving pattern), so the shared screen is a real captured and
/// encoded track even though headless Chromium has no screen.
const CHROMIUM_FLAGS: &[&str] = &["--window-size=1280,800"];

/// Waits until `viewer` sees `attribute` (a `data-*` name) of `sender`'s camera tile at `value`.
async fn wait_for_tile_attribute(
    viewer: &Person,
    sender: &impl InTheRoom,
    attribute: &str,
    value: &str,
) -> Result<()> {
    let selector = js(&tile_selector(sender, "camera"));
    viewer
        .page
        .wait_for(
            &format!(
                "document.querySelector({selector})?.getAttribute({attr}) === {value}",
                attr = js(attribute),
                value = js(value),
            ),
            WAIT,
            &format!("{}'s tile to show {attribute}={value}", sender.name()),
        )
        .await
        .map(drop)
}

/// The real VP8 clip the headless client publishes (ffmpeg's testsrc pattern; see its README).
const IVF_CLIP: &str = "../client/testdata/testsrc-320x240-30fps.ivf";
/// The clip's frame size: the SFU forwards without transcoding, so pages decode exactly this.
const IVF_SIZE: (u64, u64) = (320, 240);
/// Its sound (a 440 Hz sine, Opus).
const OGG_CLIP: &str = "../client/testdata/sine-440hz-48k.ogg";

/// A headless client from `client/` in the call, publishing real media from files.
struct HeadlessGuest {
    peer: HeadlessPeer,
    name: String,
}

impl InTheRoom for HeadlessGuest {
    fn id(&self) -> &str {
        self.peer.participant_id()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Where the test saves its screenshot of the call.
fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser/three-way-call.png")
}

/// Where a failing run leaves a screenshot of every page.
fn failure_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser/failure")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_page_works_in_chromium() {
    let Some(chromium) = cdp::chromium_or_skip() else {
        return;
    };
    let server = start_server(&[]).await;
    let browser = Browser::launch(&chromium, CHROMIUM_FLAGS)
        .await
        .unwrap_or_else(|e| panic!("Chromium did not start: {e}"));
    let outcome = call_in_three_windows(&browser, server).await;
    if let Err(e) = outcome {
        let screenshots = browser.screenshot_every_page(&failure_dir()).await;
        let stderr = browser.stderr_tail();
        browser.close().await;
        panic!(
            "{e}\n--- what each page showed ---\n{screenshots}\n\
             --- Chromium's last stderr lines ---\n{stderr}"
        );
    }
    browser.close().await;
}

/// The whole story, in the order a call goes; each step leaves the call as the next expects.
async fn call_in_three_windows(browser: &Browser, server: Server) -> Result<()> {
    let base = format!("http://{}", server.addr);
    let (mut ada, mut bob, mut cy) = step("three people join through the link", async {
        let ada = Person::join(browser, &base, ROOM, "Ada").await?;
        let bob = Person::join(browser, &base, ROOM, "Bob").await?;
        // Cy's link opts out of simulcast; the others' plain links send it by default.
        let cy_link = format!("{base}/?room={ROOM}&name=Cy&simulcast=0");
        let cy = Person::join_at(browser, "Cy", &cy_link).await?;
        Ok((ada, bob, cy))
    })
    .await?;
    step(
        "everyone sees the others' moving video",
        everyone_sees_everyone(&[&ada, &bob, &cy]),
    )
    .await?;
    step(
        "cameras go out as simulcast unless the link says simulcast=0",
        simulcast_unless_opted_out(&ada, &bob, &cy),
    )
    .await?;
    step(
        "chat reaches every page",
        chat_reaches_everyone(&ada, &[&ada, &bob, &cy]),
    )
    .await?;
    step("a screenshot of the call", screenshot_of_the_call(&ada)).await?;
    step(
        "mutes show on the others' tiles",
        mute_shows_on_the_others(&cy, &[&ada, &bob]),
    )
    .await?;
    step(
        "a screen share is a new tile",
        screen_share_is_a_new_tile(&bob, &[&ada, &cy]),
    )
    .await?;
    step(
        "leaving removes the tile",
        leaving_removes_the_tile(&cy, &[&ada, &bob]),
    )
    .await?;
    step(
        "rejoining from the form while a screen is shared",
        rejoining_while_someone_shares(&mut cy, &bob, &ada),
    )
    .await?;
    step(
        "stopping the share removes its tile",
        stopping_the_share_removes_its_tile(&bob, &[&ada, &cy]),
    )
    .await?;
    step(
        "a headless client's IVF video plays on every page",
        headless_client_video_plays(&server, &[&ada, &bob, &cy]),
    )
    .await?;
    let server = step(
        "every page rejoins after a server restart",
        pages_rejoin_after_a_restart(server, &mut [&mut ada, &mut bob, &mut cy]),
    )
    .await?;
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// Each person decodes moving video from every other one, and the top bar counts everyone.
async fn everyone_sees_everyone(everyone: &[&Person]) -> Result<()> {
    let people = format!("{} people", everyone.len());
    for viewer in everyone {
        for sender in everyone {
            if viewer.id != sender.id {
                wait_for_moving_video(viewer, *sender, "camera").await?;
            }
        }
        viewer
            .page
            .wait_for(
                &format!(
                    "document.getElementById('participant-count').textContent === {}",
                    js(&people)
                ),
                WAIT,
                &format!("the top bar to say {people}"),
            )
            .await?;
    }
    Ok(())
}

/// `default` (plain link) sends its camera as several rid-named layers and is announced to
/// `viewer` as simulcast; `opted_out` (`?simulcast=0`) sends one encoding, announced as not.
async fn simulcast_unless_opted_out(
    viewer: &Person,
    default: &Person,
    opted_out: &Person,
) -> Result<()> {
    for (sender, simulcast) in [(default, true), (opted_out, false)] {
        // Chromium starts a simulcast camera on its smallest layer and adds the others as its
        // bandwidth estimate grows, so a layered camera is waited for until a second layer
        // is encoded; a single encoding is judged as soon as it is.
        let enough = if simulcast { 1 } else { 0 };
        let encodings = sender
            .page
            .wait_for(
                &format!(
                    "sfuTest.sendStats().then(s => {{ \
                       const camera = s.video.filter(e => e.framesEncoded > 0); \
                       return camera.length > {enough} ? camera.map(e => e.rid) : null; }})"
                ),
                WAIT,
                &format!("{}'s camera to be encoded", sender.name()),
            )
            .await?;
        let rids = encodings.as_array().cloned().unwrap_or_default();
        let layered = rids.len() > 1 && rids.iter().all(|rid| rid.is_string());
        if layered != simulcast {
            return fail(format!(
                "{} encodes its camera with rids {encodings}, expected simulcast: {simulcast}",
                sender.name()
            ));
        }
        let announced = viewer
            .page
            .eval(&format!(
                "sfuTest.state().tracks[{id}]?.find(t => t.role === 'camera')?.simulcast ?? null",
                id = js(sender.id())
            ))
            .await?;
        if announced != simulcast {
            return fail(format!(
                "{} was told {}'s camera has simulcast {announced}, expected {simulcast}",
                viewer.name(),
                sender.name()
            ));
        }
    }
    Ok(())
}

/// Saves what Ada sees (three live tiles and the chat line) once the join toasts are gone.
async fn screenshot_of_the_call(viewer: &Person) -> Result<()> {
    viewer
        .page
        .wait_for(
            "document.querySelectorAll('#toasts .toast').length === 0",
            WAIT,
            "the toasts to fade",
        )
        .await?;
    let path = screenshot_path();
    viewer.page.screenshot(&path).await?;
    println!("screenshot of the 3-way call: {}", path.display());
    Ok(())
}

/// `sender` types a line in the chat box and presses send; every page lists it under their name.
async fn chat_reaches_everyone(sender: &Person, everyone: &[&Person]) -> Result<()> {
    let text = "Hello from the browser test ✓";
    sender.page.click("#chat-input").await?;
    sender.page.type_text(text).await?;
    sender.page.click("#chat-send").await?;
    for viewer in everyone {
        viewer
            .page
            .wait_for(
                &format!(
                    "[...document.querySelectorAll('#chat-messages .chat-msg')].some(m => \
                     m.querySelector('.chat-text')?.textContent === {text} && \
                     m.querySelector('.chat-name')?.textContent === {name})",
                    text = js(text),
                    name = js(sender.name()),
                ),
                WAIT,
                &format!("{}'s chat line", sender.name()),
            )
            .await?;
    }
    let left_in_box = sender
        .page
        .eval("document.getElementById('chat-input').value")
        .await?;
    if left_in_box != "" {
        return fail(format!(
            "the chat box still holds {left_in_box} after sending"
        ));
    }
    Ok(())
}

/// Camera and microphone mutes show on the others' tiles, and video comes back on unmute.
async fn mute_shows_on_the_others(muter: &Person, others: &[&Person]) -> Result<()> {
    muter.page.click("#mute-cam").await?;
    for viewer in others {
        wait_for_tile_attribute(viewer, muter, "data-video-muted", "true").await?;
        wait_for_tile_attribute(viewer, muter, "data-status", "off").await?;
    }
    // With the camera off, the tile shows the person's avatar: the same colour everywhere.
    let own_hue = muter
        .page
        .eval("document.querySelector(\"#grid .tile[data-local='true']\").style.getPropertyValue('--hue')")
        .await?;
    for viewer in others {
        let selector = js(&tile_selector(muter, "camera"));
        let hue = viewer
            .page
            .eval(&format!(
                "document.querySelector({selector}).style.getPropertyValue('--hue')"
            ))
            .await?;
        if hue != own_hue {
            return fail(format!(
                "{}'s avatar has hue {own_hue} on their own page but {hue} on {}'s",
                muter.name(),
                viewer.name()
            ));
        }
    }
    muter.page.click("#mute-mic").await?;
    for viewer in others {
        wait_for_tile_attribute(viewer, muter, "data-audio-muted", "true").await?;
    }
    muter.page.click("#mute-cam").await?;
    muter.page.click("#mute-mic").await?;
    for viewer in others {
        wait_for_tile_attribute(viewer, muter, "data-video-muted", "false").await?;
        wait_for_tile_attribute(viewer, muter, "data-audio-muted", "false").await?;
        wait_for_moving_video(viewer, muter, "camera").await?;
    }
    Ok(())
}

/// The id the server gave `sharer`'s published track with `role` ("camera", "screen", "mic").
async fn own_track_id(sharer: &Person, role: &str) -> Result<String> {
    let id = sharer
        .page
        .wait_for(
            &format!(
                "sfuTest.state().ownTracks.find(t => t.role === {role})?.track_id",
                role = js(role)
            ),
            WAIT,
            &format!("the server to name {}'s {role} track", sharer.name()),
        )
        .await?;
    Ok(id.as_str().unwrap_or_default().to_owned())
}

/// Waits until `viewer` decodes moving video from `sender`'s `kind` tile, and checks that the
/// tile shows the track the sender published in that role (a screen is not shown as a camera).
async fn wait_for_role(viewer: &Person, sender: &Person, kind: &str) -> Result<()> {
    let stats = wait_for_moving_video(viewer, sender, kind).await?;
    let published = own_track_id(sender, kind).await?;
    if stats["track_id"] != published.as_str() {
        return fail(format!(
            "{} shows {}'s track {} as their {kind}, but their {kind} track is {published}",
            viewer.name(),
            sender.name(),
            stats["track_id"]
        ));
    }
    Ok(())
}

/// A screen share shows as a second, moving tile on the others' pages, beside the camera.
async fn screen_share_is_a_new_tile(sharer: &Person, others: &[&Person]) -> Result<()> {
    sharer.start_screen_share().await?;
    for viewer in others {
        wait_for_role(viewer, sharer, "screen").await?;
        wait_for_role(viewer, sharer, "camera").await?;
    }
    Ok(())
}

/// Stopping the share removes its tile from the others' pages; the camera tile stays live.
async fn stopping_the_share_removes_its_tile(sharer: &Person, others: &[&Person]) -> Result<()> {
    sharer.page.click("#share-screen").await?;
    for viewer in others {
        wait_for_no_tile(viewer, sharer, "screen").await?;
        wait_for_moving_video(viewer, sharer, "camera").await?;
    }
    Ok(())
}

/// The leave button takes the leaver back to the join form and removes them from the others.
async fn leaving_removes_the_tile(leaver: &Person, others: &[&Person]) -> Result<()> {
    leaver.page.click("#leave").await?;
    leaver
        .page
        .wait_for(
            "!document.getElementById('join-view').hidden && document.getElementById('call-view').hidden",
            WAIT,
            "the join form after leaving",
        )
        .await?;
    for viewer in others {
        wait_for_no_tile(viewer, leaver, "camera").await?;
        viewer
            .page
            .wait_for(
                "document.getElementById('participant-count').textContent === '2 people'",
                WAIT,
                "the count to drop to 2 people",
            )
            .await?;
    }
    Ok(())
}

/// Someone who left joins again from the join form (room and name still filled in) while
/// another person shares their screen: they see that person's camera and screen as such, and
/// everyone sees them again.
async fn rejoining_while_someone_shares(
    rejoiner: &mut Person,
    sharer: &Person,
    other: &Person,
) -> Result<()> {
    let form = rejoiner
        .page
        .eval("[document.getElementById('room').value, document.getElementById('name').value]")
        .await?;
    if form != serde_json::json!([ROOM, rejoiner.name()]) {
        return fail(format!("the join form after leaving holds {form}"));
    }
    rejoiner.page.click("#join").await?;
    let id = rejoiner
        .page
        .wait_for(
            "sfuTest.state().joined && sfuTest.state().participantId",
            WAIT,
            "joining again",
        )
        .await?;
    rejoiner.id = id.as_str().unwrap_or_default().to_owned();
    wait_for_role(rejoiner, sharer, "camera").await?;
    wait_for_role(rejoiner, sharer, "screen").await?;
    wait_for_moving_video(rejoiner, other, "camera").await?;
    for viewer in [sharer, other] {
        wait_for_moving_video(viewer, rejoiner, "camera").await?;
    }
    Ok(())
}

/// The server goes away and comes back on the same address: every page says it is
/// reconnecting, then rejoins by itself (new ids, fresh peer connections) and everyone sees
/// everyone's moving video again. Returns the new server.
async fn pages_rejoin_after_a_restart(
    server: Server,
    everyone: &mut [&mut Person],
) -> Result<Server> {
    let addr = server.addr;
    server.shutdown(Duration::from_secs(5)).await;
    for person in everyone.iter() {
        person
            .page
            .wait_for(
                "sfuTest.state().phase === 'reconnecting' && !document.getElementById('notices').hidden",
                WAIT,
                "the page to say it is reconnecting",
            )
            .await?;
    }
    let config = ServerConfig::parse_from([
        "sfu-server",
        "--listen",
        &addr.to_string(),
        "--ice-ip",
        "127.0.0.1",
    ]);
    let server = Server::start(config)
        .await
        .map_err(|e| CdpError(format!("restarting the server on {addr}: {e}")))?;
    let others = everyone.len() - 1;
    for person in everyone.iter_mut() {
        let id = person
            .page
            .wait_for(
                &format!(
                    "sfuTest.state().phase === 'joined' && \
                     sfuTest.state().participants.length === {others} && \
                     document.getElementById('notices').hidden && sfuTest.state().participantId"
                ),
                WAIT,
                "the page to rejoin with everyone else",
            )
            .await?;
        person.id = id.as_str().unwrap_or_default().to_owned();
    }
    let everyone: Vec<&Person> = everyone.iter().map(|person| &**person).collect();
    everyone_sees_everyone(&everyone).await?;
    Ok(server)
}

/// A headless client joins publishing the IVF clip (and the Ogg sound): every page decodes its
/// video, moving, at the clip's own size. When it leaves, its tile goes from every page.
async fn headless_client_video_plays(server: &Server, viewers: &[&Person]) -> Result<()> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let name = "Headless";
    let url = format!("ws://{}/ws", server.addr);
    let mut config = PeerConfig::new(url, ROOM, name)
        .video_file(manifest_dir.join(IVF_CLIP))
        .and_then(|config| config.audio_file(manifest_dir.join(OGG_CLIP)))
        .map_err(|e| CdpError(format!("loading the client's test media: {e}")))?;
    // Everyone else sends real media too: no synthetic probes to read in it.
    config.read_probes = false;
    let guest = HeadlessGuest {
        peer: HeadlessPeer::join(config)
            .await
            .map_err(|e| CdpError(format!("the headless client could not join: {e}")))?,
        name: name.to_owned(),
    };
    for viewer in viewers {
        let stats = wait_for_moving_video(viewer, &guest, "camera").await?;
        let size = (
            stats["frameWidth"].as_u64().unwrap_or_default(),
            stats["frameHeight"].as_u64().unwrap_or_default(),
        );
        if size != IVF_SIZE {
            return fail(format!(
                "{} decodes the clip at {}x{}, not {}x{}",
                viewer.name(),
                size.0,
                size.1,
                IVF_SIZE.0,
                IVF_SIZE.1
            ));
        }
    }
    let id = guest.id().to_owned();
    guest
        .peer
        .leave()
        .await
        .map_err(|e| CdpError(format!("the headless client could not leave: {e}")))?;
    for viewer in viewers {
        viewer
            .page
            .wait_for(
                &format!("!document.querySelector(\"#grid .tile[data-participant-id='{id}']\")"),
                WAIT,
                "the headless client's tile to disappear",
            )
            .await?;
    }
    Ok(())
}
