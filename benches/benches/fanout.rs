//! Micro-benchmarks of the fan-out hot path: one publisher packet forwarded to N subscribers
//! (decide, rewrite, marshal, SRTP protect per subscriber), with allocations per
//! subscriber-packet from a counting allocator, and in the same run the ceilings each figure
//! is compared with: a raw `sendto` of a packet of the same size over loopback UDP, and SRTP
//! protect alone. Ends with a table of ns per subscriber-packet and ratios to the ceiling.
//!
//! Time is the bench thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`), so time spent
//! descheduled while other builds share the machine does not count; `SFU_BENCH_WALL_CLOCK=1`
//! measures wall time instead.
//!
//! `cargo bench -p sfu-benches --bench fanout` (criterion's filters and flags work after `--`).

use std::cell::RefCell;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput};
use rtc::shared::marshal::Marshal;
use rtc::srtp::protection_profile::ProtectionProfile;
use sfu_benches::alloc_count::{count_allocations, CountingAllocator};
use sfu_benches::hot_path::{srtp_context, FanoutPath, Media, SourceStream, Stage};
use sfu_benches::report::target_dir;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Subscribers per published track.
const SUBSCRIBER_COUNTS: [usize; 4] = [1, 10, 100, 1000];
/// Subscribers for the per-stage breakdown and the audio variant.
const BREAKDOWN_SUBSCRIBERS: usize = 100;
/// Publisher packets run outside the measurement to count allocations.
const ALLOCATION_SAMPLE_PACKETS: u64 = 200;

/// AES128_CM_HMAC_SHA1_80 is what browsers negotiate with webrtc-rs: libwebrtc lists it
/// before the GCM profiles, webrtc-rs as DTLS server takes the client's order, and as client
/// BoringSSL picks by its own order. AEAD_AES_128_GCM is first in webrtc-rs's own list, so
/// it is what two webrtc-rs peers (the headless clients and this server) negotiate.
const PROFILES: [(&str, ProtectionProfile); 2] = [
    ("aes128cm_sha1_80", ProtectionProfile::Aes128CmHmacSha1_80),
    ("aead_aes128_gcm", ProtectionProfile::AeadAes128Gcm),
];

/// The calling thread's CPU time as criterion's measurement (values in ns, shown like
/// durations).
struct ThreadCpuTime {
    /// Lends its duration formatter.
    wall: WallTime,
}

fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to; the clock id is a Linux constant.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(status, 0, "CLOCK_THREAD_CPUTIME_ID is readable");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = Duration;

    fn start(&self) -> u64 {
        thread_cpu_nanos()
    }

    fn end(&self, started: u64) -> Duration {
        Duration::from_nanos(thread_cpu_nanos().saturating_sub(started))
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

/// One benchmark that ran in this process: where criterion put its estimate, and what the
/// counting allocator saw.
struct Ran {
    group: String,
    id: String,
    /// Subscriber-packets per iteration.
    elements: u64,
    /// Allocation calls per subscriber-packet, when counted.
    allocations_per_element: Option<f64>,
}

thread_local! {
    /// Benchmarks that ran (criterion only calls a routine whose id passes the filter).
    static RAN: RefCell<Vec<Ran>> = const { RefCell::new(Vec::new()) };
}

fn record(group: &str, id: &str, elements: u64, allocations_per_element: Option<f64>) {
    RAN.with(|ran| {
        let mut ran = ran.borrow_mut();
        if !ran.iter().any(|r| r.group == group && r.id == id) {
            if let Some(per) = allocations_per_element {
                println!("allocations: {group}/{id}: {per:.2} per subscriber-packet");
            }
            ran.push(Ran {
                group: group.to_owned(),
                id: id.to_owned(),
                elements,
                allocations_per_element,
            });
        }
    });
}

/// Whether the measured subscribers still receive the layer they started on (they share the
/// publisher's payload) or have switched layers, which gives them their own picture numbers
/// in a copy of the payload: one copy per packet for all when they switched together, one
/// each when they switched apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subscribers {
    Started,
    SwitchedTogether,
    SwitchedApart,
}

/// A path with `subscribers` subscribers that all started on a keyframe (and, if `switched`,
/// moved to another source on a second one).
fn started_path(
    subscribers: usize,
    media: Media,
    profile: ProtectionProfile,
    switched: Subscribers,
) -> (FanoutPath, SourceStream) {
    let mut stream = SourceStream::new(media);
    let mut path = FanoutPath::new(subscribers, media, profile);
    let start = stream.start_packet().clone();
    let started = path.forward(&start, Instant::now(), Stage::Protect);
    assert_eq!(started.packets, subscribers, "every subscriber starts");
    // Subscriber i switches i + 1 times (apart) or once (together); each switch moves its
    // numbers one further from the publisher's, so apart they all differ.
    let switches = |index: usize| match switched {
        Subscribers::Started => 0,
        Subscribers::SwitchedTogether => 1,
        Subscribers::SwitchedApart => index + 1,
    };
    for round in 0..(0..subscribers).map(switches).max().unwrap_or(0) {
        for index in (0..subscribers).filter(|&index| switches(index) > round) {
            path.switch_source_of(index);
        }
        let start = stream.start_packet().clone();
        let moved = path.forward(&start, Instant::now(), Stage::Protect);
        assert_eq!(
            moved.packets, subscribers,
            "every subscriber forwards the keyframe"
        );
    }
    // Past the keyframe, so the measured packets are ordinary ones.
    path.forward(stream.next_packet(), Instant::now(), Stage::Protect);
    (path, stream)
}

/// Allocation calls per subscriber-packet over a sample of packets (run on this thread only).
fn allocations_per_element(path: &mut FanoutPath, stream: &mut SourceStream, stage: Stage) -> f64 {
    let subscribers = path
        .forward(stream.next_packet(), Instant::now(), Stage::Decide)
        .packets as u64;
    let (_, calls) = count_allocations(|| {
        for _ in 0..ALLOCATION_SAMPLE_PACKETS {
            std::hint::black_box(path.forward(stream.next_packet(), Instant::now(), stage));
        }
    });
    calls as f64 / (ALLOCATION_SAMPLE_PACKETS * subscribers.max(1)) as f64
}

fn bench_path<M: Measurement>(
    c: &mut Criterion<M>,
    group_name: &str,
    counts: &[usize],
    media: Media,
    profile: ProtectionProfile,
    stage: Stage,
    switched: Subscribers,
) {
    let mut group = c.benchmark_group(group_name);
    for &subscribers in counts {
        group.throughput(Throughput::Elements(subscribers as u64));
        let (mut path, mut stream) = started_path(subscribers, media, profile, switched);
        let id = subscribers.to_string();
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            let per = allocations_per_element(&mut path, &mut stream, stage);
            record(group_name, &id, subscribers as u64, Some(per));
            // `Instant::now()` once per publisher packet, as the fan-out task does.
            b.iter(|| path.forward(stream.next_packet(), Instant::now(), stage));
        });
    }
    group.finish();
}

fn fanout_benches<M: Measurement>(c: &mut Criterion<M>) {
    for (label, profile) in PROFILES {
        bench_path(
            c,
            &format!("fanout_video_{label}"),
            &SUBSCRIBER_COUNTS,
            Media::Video,
            profile,
            Stage::Protect,
            Subscribers::Started,
        );
    }
    let (_, browser_profile) = PROFILES[0];
    for (label, stage) in [
        ("decide", Stage::Decide),
        ("rewrite", Stage::Rewrite),
        ("marshal", Stage::Marshal),
    ] {
        bench_path(
            c,
            &format!("stage_video_{label}"),
            &[BREAKDOWN_SUBSCRIBERS],
            Media::Video,
            browser_profile,
            stage,
            Subscribers::Started,
        );
    }
    bench_path(
        c,
        "fanout_audio_aes128cm_sha1_80",
        &[BREAKDOWN_SUBSCRIBERS],
        Media::Audio,
        browser_profile,
        Stage::Protect,
        Subscribers::Started,
    );
    for (label, switched) in [
        ("together", Subscribers::SwitchedTogether),
        ("apart", Subscribers::SwitchedApart),
    ] {
        bench_path(
            c,
            &format!("fanout_video_switched_{label}_aes128cm_sha1_80"),
            &[BREAKDOWN_SUBSCRIBERS],
            Media::Video,
            browser_profile,
            Stage::Protect,
            switched,
        );
    }
}

/// The SRTP packet the video path produces, for the ceilings: same size on the wire.
fn protected_video_packet(profile: ProtectionProfile) -> (Vec<u8>, Vec<u8>) {
    let mut path = FanoutPath::new(1, Media::Video, profile);
    let mut stream = SourceStream::new(Media::Video);
    let start = stream.start_packet().clone();
    let mut plain = Vec::new();
    path.forward_marshalled(&start, Instant::now(), false, |_, p| plain = p.to_vec());
    let mut wire = Vec::new();
    path.forward_marshalled(stream.next_packet(), Instant::now(), true, |_, w| {
        wire = w.to_vec()
    });
    (plain, wire)
}

/// A receiver on 127.0.0.1 that drains its socket until dropped, as a client would.
struct LoopbackReceiver {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl LoopbackReceiver {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a loopback receiver");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set a read timeout");
        let addr = socket.local_addr().expect("receiver address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut received = 0;
            while !stopping.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    received += 1;
                }
            }
            received
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LoopbackReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn ceiling_benches<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("ceiling");
    group.throughput(Throughput::Elements(1));
    let (_, browser_profile) = PROFILES[0];
    let (_, wire) = protected_video_packet(browser_profile);
    let sendto_id = format!("sendto_loopback_{}B", wire.len());
    group.bench_function(&sendto_id, |b| {
        record("ceiling", &sendto_id, 1, None);
        let receiver = LoopbackReceiver::start();
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind a loopback sender");
        b.iter(|| {
            sender
                .send_to(&wire, receiver.addr)
                .expect("loopback sendto")
        });
    });

    for (label, profile) in PROFILES {
        let (mut plain, _) = protected_video_packet(profile);
        let mut context = srtp_context(profile, 7);
        let id = format!("srtp_protect_only_{label}");
        group.bench_function(&id, |b| {
            let mut seq = 0u16;
            let (_, calls) = count_allocations(|| {
                for _ in 0..ALLOCATION_SAMPLE_PACKETS {
                    seq = seq.wrapping_add(1);
                    plain[2..4].copy_from_slice(&seq.to_be_bytes());
                    std::hint::black_box(context.encrypt_rtp(&plain).expect("protect"));
                }
            });
            record(
                "ceiling",
                &id,
                1,
                Some(calls as f64 / ALLOCATION_SAMPLE_PACKETS as f64),
            );
            b.iter(|| {
                seq = seq.wrapping_add(1);
                plain[2..4].copy_from_slice(&seq.to_be_bytes());
                context.encrypt_rtp(&plain).expect("protect")
            });
        });
    }

    // The marshal step alone, for the breakdown (what webrtc-rs's SRTP handler does first).
    let mut stream = SourceStream::new(Media::Video);
    let packet = stream.start_packet().clone();
    group.bench_function("rtp_marshal_only", |b| {
        record("ceiling", "rtp_marshal_only", 1, None);
        b.iter(|| packet.marshal().expect("marshal"));
    });
    group.finish();
}

/// Criterion's point estimate of one iteration, in ns (the slope when it fitted one).
fn estimate_ns(output: &std::path::Path, group: &str, id: &str) -> Option<f64> {
    let path = output.join(group).join(id).join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    ["slope", "mean"]
        .iter()
        .find_map(|key| json[*key]["point_estimate"].as_f64())
}

fn print_summary(output: &std::path::Path, clock: &str) {
    let ran = RAN.with(|ran| std::mem::take(&mut *ran.borrow_mut()));
    let per_element =
        |r: &Ran| estimate_ns(output, &r.group, &r.id).map(|ns| ns / r.elements as f64);
    let ceiling = ran
        .iter()
        .find(|r| r.group == "ceiling" && r.id.starts_with("sendto_loopback"))
        .and_then(per_element);
    println!();
    println!(
        "Summary ({clock}, ns per subscriber-packet; ratio = that / one loopback sendto of the \
         same packet)"
    );
    println!(
        "{:<46} {:>6} {:>12} {:>10} {:>14}",
        "bench", "N", "ns/sub-pkt", "ratio", "allocs/sub-pkt"
    );
    for r in &ran {
        let Some(ns) = per_element(r) else {
            continue;
        };
        let ratio = ceiling.map_or("-".to_owned(), |c| format!("{:.2}", ns / c));
        let allocations = r
            .allocations_per_element
            .map_or("-".to_owned(), |a| format!("{a:.2}"));
        let n = if r.group == "ceiling" { "-" } else { &r.id };
        println!(
            "{:<46} {:>6} {:>12.1} {:>10} {:>14}",
            if r.group == "ceiling" {
                &r.id
            } else {
                &r.group
            },
            n,
            ns,
            ratio,
            allocations
        );
    }
}

fn run<M: Measurement>(criterion: Criterion<M>, output: &std::path::Path, clock: &str) {
    let mut criterion = criterion
        .output_directory(output)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    fanout_benches(&mut criterion);
    ceiling_benches(&mut criterion);
    criterion.final_summary();
    print_summary(output, clock);
}

fn main() {
    let output = target_dir().join("criterion");
    if std::env::var_os("SFU_BENCH_WALL_CLOCK").is_some_and(|v| v != "0") {
        run(Criterion::default(), &output, "wall time");
    } else {
        let cpu = Criterion::default().with_measurement(ThreadCpuTime { wall: WallTime });
        run(cpu, &output, "thread CPU time");
    }
}
