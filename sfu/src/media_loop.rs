//! The media loop: one per media thread. It owns that thread's UDP socket (one per advertised
//! address), every peer connection of the rooms placed on the thread (rtc's sans-IO
//! `RTCPeerConnection`, which reads no clock and touches no socket), and their tracks'
//! fan-outs. A datagram is read, handed to its connection, and whatever comes out of it
//! (media to forward, events, datagrams to send) is dealt with in the same pass: a forwarded
//! packet crosses no task, channel or lock between the publisher's socket read and the
//! subscribers' socket writes (docs/sans-io.md measured what that saves). Participants
//! negotiating and rooms changing subscriptions talk to the loop through [`LoopHandle`].

use crate::fanout::{self, Fanout, FanoutCommand, FanoutHandle, MediaIo, PublisherSource};
use crate::metrics::Metrics;
use crate::transport::{IceCredentials, PeerFactory, PeerRole, PortLease, TransportError};
use bytes::BytesMut;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// A connection of one media loop; stale keys (of a closed connection) find nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnKey {
    index: usize,
    generation: u64,
}

/// A fan-out of one media loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FanoutKey {
    index: usize,
    generation: u64,
}

/// What a connection tells its owner.
pub(crate) enum ConnEvent {
    /// The connection's overall state changed.
    State(RTCPeerConnectionState),
    /// Media of a new incoming track arrived (publisher connections).
    Track(RemoteTrack),
    /// RTCP the SFU acts on (keyframe requests, bandwidth estimates) about the tracks this
    /// connection sends (subscriber connections).
    Feedback(Vec<Box<dyn rtc::rtcp::Packet>>),
}

/// An incoming track whose media started, and the fan-out the loop made for it.
pub(crate) struct RemoteTrack {
    /// The m-section it arrived on.
    pub(crate) mid: Option<String>,
    pub(crate) codec: RTCRtpCodec,
    /// The publisher's negotiated header extensions, `(id, uri)`.
    pub(crate) extensions: fanout::ExtensionMap,
    pub(crate) fanout: FanoutHandle,
}

/// Receives a connection's events; called on the media thread, so it must not block.
pub(crate) type EventCallback = Box<dyn Fn(ConnEvent) + Send>;

type PcCall = Box<dyn FnOnce(&mut RTCPeerConnection, Instant) + Send>;

enum LoopCommand {
    Open {
        role: PeerRole,
        on_event: EventCallback,
        reply: oneshot::Sender<Result<ConnKey, TransportError>>,
    },
    Call {
        conn: ConnKey,
        call: PcCall,
    },
    Close {
        conn: ConnKey,
        done: Option<oneshot::Sender<()>>,
    },
    Fanout {
        fanout: FanoutKey,
        command: FanoutCommand,
    },
}

/// How participants and fan-out handles reach a media loop. The loop runs until every handle
/// is dropped.
#[derive(Clone)]
pub(crate) struct LoopHandle {
    commands: mpsc::UnboundedSender<LoopCommand>,
}

/// Why a call on a connection found nothing to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionGone;

impl LoopHandle {
    /// Binds the loop's sockets (one per advertised address, all on one port) and starts the
    /// loop with `spawn`, which must run it on the media thread it serves.
    pub(crate) fn start(
        factory: Arc<PeerFactory>,
        spawn: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
    ) -> Result<Self, TransportError> {
        let (sockets, lease) = factory.bind_media_sockets()?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let metrics = factory.metrics().clone();
        let weak = commands.downgrade();
        spawn(Box::pin(async move {
            let mut bound = Vec::with_capacity(sockets.len());
            for socket in sockets {
                let local = match socket.local_addr() {
                    Ok(local) => local,
                    Err(e) => {
                        tracing::error!(error = %e, "media socket has no address");
                        return;
                    }
                };
                match tokio::net::UdpSocket::from_std(socket) {
                    Ok(udp) => bound.push(MediaSocket { udp, local }),
                    Err(e) => {
                        tracing::error!(error = %e, "media socket could not join the runtime");
                        return;
                    }
                }
            }
            tracing::info!(addrs = ?bound.iter().map(|s| s.local).collect::<Vec<_>>(), "media loop started");
            MediaLoop::new(factory, weak, metrics, bound, lease)
                .run(receiver)
                .await;
        }));
        Ok(Self { commands })
    }

    /// Creates a connection; its events go to `on_event`.
    pub(crate) async fn open(
        &self,
        role: PeerRole,
        on_event: EventCallback,
    ) -> Result<ConnKey, TransportError> {
        let (reply, opened) = oneshot::channel();
        self.send(LoopCommand::Open {
            role,
            on_event,
            reply,
        });
        opened
            .await
            .map_err(|_| TransportError::Setup("the media loop has stopped".into()))?
    }

    /// Runs `call` on the connection, on the media thread; whatever it writes is sent before
    /// the loop does anything else.
    pub(crate) async fn call<R: Send + 'static>(
        &self,
        conn: ConnKey,
        call: impl FnOnce(&mut RTCPeerConnection, Instant) -> R + Send + 'static,
    ) -> Result<R, ConnectionGone> {
        let (reply, result) = oneshot::channel();
        self.send(LoopCommand::Call {
            conn,
            call: Box::new(move |pc, now| {
                let _ = reply.send(call(pc, now));
            }),
        });
        result.await.map_err(|_| ConnectionGone)
    }

    /// Closes the connection (telling the peer) and forgets it with its fan-outs.
    pub(crate) async fn close(&self, conn: ConnKey) {
        let (done, closed) = oneshot::channel();
        self.send(LoopCommand::Close {
            conn,
            done: Some(done),
        });
        let _ = closed.await;
    }

    /// Like [`Self::close`], without waiting.
    pub(crate) fn close_soon(&self, conn: ConnKey) {
        self.send(LoopCommand::Close { conn, done: None });
    }

    pub(crate) fn fanout(&self, fanout: FanoutKey, command: FanoutCommand) {
        self.send(LoopCommand::Fanout { fanout, command });
    }

    fn send(&self, command: LoopCommand) {
        // Fails only once the loop is gone, when there is nothing left to tell.
        let _ = self.commands.send(command);
    }
}

struct MediaSocket {
    udp: tokio::net::UdpSocket,
    local: SocketAddr,
}

struct Conn {
    generation: u64,
    pc: RTCPeerConnection,
    role: PeerRole,
    ufrag: String,
    on_event: EventCallback,
    /// `(local, remote)` address pairs routed here, forgotten with the connection.
    routes: Vec<(SocketAddr, SocketAddr)>,
    /// Publisher connections: incoming track id → its fan-out.
    tracks: HashMap<String, FanoutKey>,
    /// The earliest instant this connection has in the timer heap.
    scheduled: Option<Instant>,
    /// What the connection needs before the loop sleeps; queued once in `MediaLoop::dirty`.
    dirty: Dirt,
}

/// Why a connection is queued for service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dirt {
    Clean,
    /// Only media was written to it: its datagrams are to be sent. Most common by far (every
    /// forwarded packet makes each subscriber's connection this), and the cheapest: nothing
    /// can have come out of it but datagrams.
    Written,
    /// It had input, a timer or a call: its events and reads are to be drained too.
    Touched,
}

struct FanoutSlot {
    generation: u64,
    publisher: ConnKey,
    track_id: String,
    fanout: Fanout,
}

/// Most address pairs one connection may collect: a few candidates per family is what a
/// client has; the bound keeps a client spraying checks from growing the routing table.
const MAX_ROUTES_PER_CONNECTION: usize = 16;
/// Most datagrams read per wake-up before commands and timers get a turn.
const MAX_READS_PER_WAKE: usize = 64;
/// Room for one datagram in the receive buffer (WebRTC stays under the path MTU).
const DATAGRAM_ROOM: usize = 2048;

struct MediaLoop {
    factory: Arc<PeerFactory>,
    /// The loop's own channel, weak so that the loop stops once every handle is gone; fan-out
    /// handles are made from it.
    handle: mpsc::WeakUnboundedSender<LoopCommand>,
    metrics: Metrics,
    sockets: Vec<MediaSocket>,
    /// Keeps the loop's port out of the pool while it runs.
    _lease: Option<PortLease>,
    conns: Slab<Conn>,
    fanouts: Slab<FanoutSlot>,
    generation: u64,
    by_ufrag: HashMap<String, ConnKey>,
    by_route: HashMap<(SocketAddr, SocketAddr), ConnKey>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    dirty: Vec<ConnKey>,
    receive_buffer: BytesMut,
    /// The socket to look at first for datagrams.
    next_socket: usize,
    /// Reused between services so draining a connection allocates nothing.
    scratch_reads: Vec<RTCMessage>,
    scratch_events: Vec<RTCPeerConnectionEvent>,
}

/// What woke the loop.
enum Wake {
    Command(Option<LoopCommand>),
    Readable(usize),
    Timer,
}

impl MediaLoop {
    fn new(
        factory: Arc<PeerFactory>,
        handle: mpsc::WeakUnboundedSender<LoopCommand>,
        metrics: Metrics,
        sockets: Vec<MediaSocket>,
        lease: Option<PortLease>,
    ) -> Self {
        Self {
            factory,
            handle,
            metrics,
            sockets,
            _lease: lease,
            conns: Slab::new(),
            fanouts: Slab::new(),
            generation: 0,
            by_ufrag: HashMap::new(),
            by_route: HashMap::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            receive_buffer: BytesMut::new(),
            next_socket: 0,
            scratch_reads: Vec::new(),
            scratch_events: Vec::new(),
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<LoopCommand>) {
        loop {
            let deadline = self.timers.peek().map(|Reverse((at, _, _))| *at);
            let wake = {
                let sockets = &self.sockets;
                // Starting after the socket read last, so one busy socket cannot starve another.
                let first = self.next_socket;
                let readable = std::future::poll_fn(|cx| {
                    for offset in 0..sockets.len() {
                        let index = (first + offset) % sockets.len();
                        if sockets[index].udp.poll_recv_ready(cx).is_ready() {
                            return Poll::Ready(index);
                        }
                    }
                    Poll::Pending
                });
                tokio::select! {
                    biased;
                    command = commands.recv() => Wake::Command(command),
                    index = readable => Wake::Readable(index),
                    _ = sleep_until(deadline) => Wake::Timer,
                }
            };
            match wake {
                Wake::Command(Some(command)) => self.command(command),
                Wake::Command(None) => break,
                Wake::Readable(index) => {
                    self.next_socket = (index + 1) % self.sockets.len();
                    self.receive(index);
                }
                Wake::Timer => {}
            }
            // What was read is acted on first, so reports and feedback built by the timers
            // include it. Then the timers, whatever woke the loop: under a steady stream of
            // datagrams the socket is always ready, and feedback, reports and keepalives must
            // still go out on time.
            self.service_dirty();
            self.fire_timers();
            self.service_dirty();
            // The rooms' participant and room tasks share this thread. Without a yield they
            // would run only when tokio's cooperative budget ran out, after many passes: under
            // load a negotiation step or a quality change then waited for seconds.
            tokio::task::yield_now().await;
        }
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .map(|(index, c)| ConnKey {
                index,
                generation: c.generation,
            })
            .collect();
        for key in keys {
            self.close(key);
        }
        tracing::debug!("media loop stopped");
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns
            .get_mut(key.index)
            .filter(|c| c.generation == key.generation)
    }

    fn command(&mut self, command: LoopCommand) {
        match command {
            LoopCommand::Open {
                role,
                on_event,
                reply,
            } => {
                let _ = reply.send(self.open(role, on_event));
            }
            LoopCommand::Call { conn, call } => {
                let now = Instant::now();
                if let Some(c) = self.conn_mut(conn) {
                    call(&mut c.pc, now);
                    self.mark_dirty(conn);
                }
                // Dropped uncalled otherwise: the caller learns the connection is gone.
            }
            LoopCommand::Close { conn, done } => {
                self.close(conn);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            LoopCommand::Fanout { fanout, command } => self.fanout_command(fanout, command),
        }
    }

    fn open(&mut self, role: PeerRole, on_event: EventCallback) -> Result<ConnKey, TransportError> {
        let credentials = loop {
            let credentials = IceCredentials::random();
            if !self.by_ufrag.contains_key(&credentials.ufrag) {
                break credentials;
            }
        };
        let locals: Vec<SocketAddr> = self.sockets.iter().map(|s| s.local).collect();
        let ufrag = credentials.ufrag.clone();
        let pc = self
            .factory
            .build(role, credentials, &locals, Instant::now())?;
        let generation = self.next_generation();
        let index = self.conns.insert(Conn {
            generation,
            pc,
            role,
            ufrag: ufrag.clone(),
            on_event,
            routes: Vec::new(),
            tracks: HashMap::new(),
            scheduled: None,
            dirty: Dirt::Clean,
        });
        let key = ConnKey { index, generation };
        self.by_ufrag.insert(ufrag, key);
        self.mark_dirty(key);
        Ok(key)
    }

    fn close(&mut self, key: ConnKey) {
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if let Err(e) = conn.pc.close() {
            tracing::debug!(error = %e, "closing a connection");
        }
        // The close_notify (and anything still queued) goes out before the routes are gone.
        let mut out = Vec::new();
        while let Some(datagram) = conn.pc.poll_write() {
            out.push(datagram);
        }
        for datagram in out {
            self.send_datagram(key, datagram);
        }
        let conn = self.conns.remove(key.index);
        self.by_ufrag.remove(&conn.ufrag);
        for route in &conn.routes {
            if self.by_route.get(route) == Some(&key) {
                self.by_route.remove(route);
            }
        }
        for fanout in conn.tracks.values() {
            self.remove_fanout(*fanout);
        }
    }

    fn mark_dirty(&mut self, key: ConnKey) {
        mark_dirty(&mut self.conns, &mut self.dirty, key, Dirt::Touched);
    }

    /// Reads what is waiting on socket `index` and feeds each datagram to its connection, all
    /// of them before acting on any, each with the instant the kernel received it: the
    /// transport-wide congestion feedback browsers estimate their uplink from is built from
    /// those instants, and the time the loop spends forwarding must not look like network
    /// delay (`arrival`).
    fn receive(&mut self, index: usize) {
        for _ in 0..MAX_READS_PER_WAKE {
            self.receive_buffer.reserve(DATAGRAM_ROOM);
            let socket = &self.sockets[index];
            match crate::arrival::recv(&socket.udp, &mut self.receive_buffer) {
                Ok((from, arrived)) => {
                    let datagram = self.receive_buffer.split();
                    let local = socket.local;
                    self.input(local, from, datagram, arrived);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // An ICMP error from an earlier send, reported here; the socket is fine.
                    tracing::trace!(error = %e, "media socket receive error");
                }
            }
        }
    }

    /// Hands one datagram to the connection it belongs to: by its address pair once known,
    /// else (a STUN check from a new address) by the ufrag it names.
    fn input(&mut self, local: SocketAddr, from: SocketAddr, datagram: BytesMut, now: Instant) {
        let routed = self
            .by_route
            .get(&(local, from))
            .copied()
            .filter(|key| self.conn_mut(*key).is_some());
        let key = match routed {
            Some(key) => key,
            None => {
                let key = stun_target_ufrag(&datagram)
                    .and_then(|ufrag| self.by_ufrag.get(ufrag))
                    .copied();
                let Some(key) = key else {
                    tracing::trace!(%from, "datagram for no connection dropped");
                    return;
                };
                self.add_route(key, (local, from));
                key
            }
        };
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        let message = TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: local,
                peer_addr: from,
                transport_protocol: TransportProtocol::UDP,
                ecn: None,
            },
            message: datagram,
        };
        if let Err(e) = conn.pc.handle_read(message) {
            tracing::debug!(error = %e, "datagram not handled");
        }
        self.mark_dirty(key);
    }

    fn add_route(&mut self, key: ConnKey, route: (SocketAddr, SocketAddr)) {
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if conn.routes.contains(&route) || conn.routes.len() >= MAX_ROUTES_PER_CONNECTION {
            return;
        }
        // An address another connection already uses stays theirs.
        if let Some(owner) = self.by_route.get(&route).copied() {
            if owner != key && self.conn_mut(owner).is_some() {
                return;
            }
        }
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        conn.routes.push(route);
        self.by_route.insert(route, key);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, index, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let key = ConnKey { index, generation };
            let Some(conn) = self.conn_mut(key) else {
                continue;
            };
            if conn.scheduled != Some(at) {
                continue; // superseded by an earlier entry, which already ran
            }
            conn.scheduled = None;
            if let Err(e) = conn.pc.handle_timeout(now) {
                // The connection cannot go on (e.g. its DTLS handshake gave up): its owner
                // hears it failed and decides.
                tracing::debug!(error = %e, "connection timer failed");
                (conn.on_event)(ConnEvent::State(RTCPeerConnectionState::Failed));
            }
            self.mark_dirty(key);
        }
    }

    /// Services every connection that had input, until none has more.
    fn service_dirty(&mut self) {
        while let Some(key) = self.dirty.pop() {
            if let Some(conn) = self.conn_mut(key) {
                match std::mem::replace(&mut conn.dirty, Dirt::Clean) {
                    Dirt::Touched => self.service(key),
                    Dirt::Written => self.flush(key),
                    Dirt::Clean => {}
                }
            }
        }
    }

    /// Drains a connection: its events and reads are acted on (forwarding media marks the
    /// subscribers' connections dirty in turn), its datagrams are sent, its timer is re-armed.
    fn service(&mut self, key: ConnKey) {
        let mut events = std::mem::take(&mut self.scratch_events);
        let mut reads = std::mem::take(&mut self.scratch_reads);
        while let Some(conn) = self.conn_mut(key) {
            while let Some(event) = conn.pc.poll_event() {
                events.push(event);
            }
            while let Some(message) = conn.pc.poll_read() {
                reads.push(message.message);
            }
            if events.is_empty() && reads.is_empty() {
                break;
            }
            for event in events.drain(..) {
                self.event(key, event);
            }
            for message in reads.drain(..) {
                self.read(key, message);
            }
        }
        self.scratch_events = events;
        self.scratch_reads = reads;
        self.flush(key);
    }

    /// Sends what the connection has queued and re-arms its timer.
    fn flush(&mut self, key: ConnKey) {
        loop {
            let Some(conn) = self.conn_mut(key) else {
                return;
            };
            let Some(datagram) = conn.pc.poll_write() else {
                break;
            };
            self.send_datagram(key, datagram);
        }
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if let Some(at) = conn.pc.poll_timeout() {
            if conn.scheduled.is_none_or(|scheduled| at < scheduled) {
                conn.scheduled = Some(at);
                self.timers.push(Reverse((at, key.index, key.generation)));
            }
        }
    }

    fn send_datagram(&mut self, key: ConnKey, datagram: TaggedBytesMut) {
        let TransportContext {
            local_addr,
            peer_addr,
            ..
        } = datagram.transport;
        let Some(socket) = self
            .sockets
            .iter()
            .find(|s| s.local == local_addr)
            .or_else(|| {
                self.sockets
                    .iter()
                    .find(|s| s.local.is_ipv4() == peer_addr.is_ipv4())
            })
        else {
            return;
        };
        let local = socket.local;
        match socket.udp.try_send_to(&datagram.message, peer_addr) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.metrics
                    .dropped(crate::forwarder::DropReason::SubscriberCongested);
            }
            Err(e) => tracing::trace!(error = %e, %peer_addr, "media send failed"),
        }
        // Replies to our own checks come from where we sent them: route them back here.
        self.add_route(key, (local, peer_addr));
    }

    fn event(&mut self, key: ConnKey, event: RTCPeerConnectionEvent) {
        match event {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                if let Some(conn) = self.conn_mut(key) {
                    (conn.on_event)(ConnEvent::State(state));
                }
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                self.track_opened(key, init)
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id)) => {
                let fanout = self
                    .conn_mut(key)
                    .and_then(|conn| conn.tracks.remove(&track_id));
                if let Some(fanout) = fanout {
                    self.remove_fanout(fanout);
                }
            }
            _ => {}
        }
    }

    /// A stream of an incoming track sent its first packet: a new track gets a fan-out and
    /// its owner hears of it; another simulcast layer of a known track joins its fan-out.
    fn track_opened(&mut self, key: ConnKey, init: rtc::peer_connection::event::RTCTrackEventInit) {
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if conn.role != PeerRole::Publisher {
            return;
        }
        if let Some(fanout) = conn.tracks.get(&init.track_id).copied() {
            if let Some(slot) = self.fanout_slot(fanout) {
                slot.fanout
                    .add_layer(init.ssrc, init.rid.clone(), Instant::now());
            }
            return;
        }
        let Some(mut receiver) = conn.pc.rtp_receiver(init.receiver_id) else {
            return;
        };
        let Some(codec) = receiver.track().codec(init.ssrc).cloned() else {
            tracing::warn!("incoming track without a codec; ignored");
            return;
        };
        let extensions: fanout::ExtensionMap = receiver
            .get_parameters()
            .rtp_parameters
            .header_extensions
            .iter()
            .map(|e| (e.id, e.uri.clone()))
            .collect();
        let mid = conn
            .pc
            .rtp_transceiver(init.receiver_id.into())
            .and_then(|t| t.mid().clone());
        let now = Instant::now();
        let mut fanout = Fanout::new(
            &codec,
            &extensions,
            PublisherSource {
                conn: key,
                receiver: init.receiver_id,
            },
            self.metrics.clone(),
            now,
        );
        fanout.add_layer(init.ssrc, init.rid.clone(), now);
        let generation = self.next_generation();
        let index = self.fanouts.insert(FanoutSlot {
            generation,
            publisher: key,
            track_id: init.track_id.clone(),
            fanout,
        });
        let fanout_key = FanoutKey { index, generation };
        // Someone holds a strong handle while the connection exists: its owner.
        let Some(commands) = self.handle.upgrade() else {
            self.fanouts.remove(index);
            return;
        };
        let handle = FanoutHandle::new(fanout_key, LoopHandle { commands });
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        conn.tracks.insert(init.track_id, fanout_key);
        (conn.on_event)(ConnEvent::Track(RemoteTrack {
            mid,
            codec,
            extensions,
            fanout: handle,
        }));
    }

    fn read(&mut self, key: ConnKey, message: RTCMessage) {
        match message {
            RTCMessage::RtpPacket(track_id, packet) => {
                let Some(fanout) = self
                    .conn_mut(key)
                    .and_then(|conn| conn.tracks.get(&track_id).copied())
                else {
                    return;
                };
                self.drive_fanout(fanout, |fanout, now, io| fanout.forward(packet, now, io));
            }
            RTCMessage::RtcpPacket(_, packets) => {
                if let Some(conn) = self.conn_mut(key) {
                    if conn.role == PeerRole::Subscriber {
                        (conn.on_event)(ConnEvent::Feedback(packets));
                    }
                }
            }
            _ => {}
        }
    }

    fn fanout_slot(&mut self, key: FanoutKey) -> Option<&mut FanoutSlot> {
        self.fanouts
            .get_mut(key.index)
            .filter(|s| s.generation == key.generation)
    }

    fn fanout_command(&mut self, key: FanoutKey, command: FanoutCommand) {
        if let FanoutCommand::Close = command {
            let Some(slot) = self.fanout_slot(key) else {
                return;
            };
            let (publisher, track_id) = (slot.publisher, slot.track_id.clone());
            if let Some(conn) = self.conn_mut(publisher) {
                if conn.tracks.get(&track_id) == Some(&key) {
                    conn.tracks.remove(&track_id);
                }
            }
            self.remove_fanout(key);
            return;
        }
        self.drive_fanout(key, |fanout, now, io| fanout.handle(command, now, io));
    }

    /// Runs `f` on fan-out `key` with what it writes to: this loop's connections.
    fn drive_fanout(&mut self, key: FanoutKey, f: impl FnOnce(&mut Fanout, Instant, &mut LoopIo)) {
        let Some(slot) = self
            .fanouts
            .get_mut(key.index)
            .filter(|s| s.generation == key.generation)
        else {
            return;
        };
        let now = Instant::now();
        let mut io = LoopIo {
            conns: &mut self.conns,
            dirty: &mut self.dirty,
            now,
        };
        f(&mut slot.fanout, now, &mut io);
    }

    fn remove_fanout(&mut self, key: FanoutKey) {
        if self.fanout_slot(key).is_some() {
            self.fanouts.remove(key.index);
        }
    }
}

fn mark_dirty(conns: &mut Slab<Conn>, dirty: &mut Vec<ConnKey>, key: ConnKey, why: Dirt) {
    if let Some(conn) = conns
        .get_mut(key.index)
        .filter(|c| c.generation == key.generation)
    {
        if conn.dirty == Dirt::Clean {
            dirty.push(key);
        }
        conn.dirty = conn.dirty.max(why);
    }
}

/// What a fan-out writes to, inside the loop.
struct LoopIo<'a> {
    conns: &'a mut Slab<Conn>,
    dirty: &'a mut Vec<ConnKey>,
    now: Instant,
}

impl MediaIo for LoopIo<'_> {
    fn send_rtp(
        &mut self,
        conn: ConnKey,
        sender: RTCRtpSenderId,
        packet: rtp::Packet,
    ) -> fanout::Offer {
        let Some(c) = self
            .conns
            .get_mut(conn.index)
            .filter(|c| c.generation == conn.generation)
        else {
            return fanout::Offer::Failed;
        };
        let Some(mut rtp_sender) = c.pc.rtp_sender(sender) else {
            return fanout::Offer::Failed;
        };
        match rtp_sender.write_rtp(self.now, packet) {
            Ok(()) => {
                mark_dirty(self.conns, self.dirty, conn, Dirt::Written);
                fanout::Offer::Accepted
            }
            Err(e) => {
                tracing::trace!(error = %e, "write_rtp failed");
                fanout::Offer::Failed
            }
        }
    }

    fn request_keyframe(&mut self, publisher: PublisherSource, media_ssrc: u32) {
        let Some(c) = self
            .conns
            .get_mut(publisher.conn.index)
            .filter(|c| c.generation == publisher.conn.generation)
        else {
            return;
        };
        let Some(mut receiver) = c.pc.rtp_receiver(publisher.receiver) else {
            return;
        };
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        };
        if let Err(e) = receiver.write_rtcp(self.now, vec![Box::new(pli)]) {
            tracing::debug!(error = %e, "keyframe request not sent");
        }
        mark_dirty(self.conns, self.dirty, publisher.conn, Dirt::Written);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The ufrag a STUN binding request is addressed to: the part of its USERNAME before the
/// colon (RFC 8445 §7.2.2: "receiver's ufrag:sender's ufrag"). `None` for anything else.
fn stun_target_ufrag(datagram: &[u8]) -> Option<&str> {
    const HEADER: usize = 20;
    const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
    const USERNAME: u16 = 0x0006;
    if datagram.len() < HEADER || datagram[0] & 0xC0 != 0 || datagram[4..8] != MAGIC_COOKIE {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    let attributes = datagram.get(HEADER..HEADER + length)?;
    let mut at = 0;
    while at + 4 <= attributes.len() {
        let kind = u16::from_be_bytes([attributes[at], attributes[at + 1]]);
        let len = usize::from(u16::from_be_bytes([attributes[at + 2], attributes[at + 3]]));
        let value = attributes.get(at + 4..at + 4 + len)?;
        if kind == USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next().filter(|u| !u.is_empty());
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, value) in attributes {
            body.extend_from_slice(&kind.to_be_bytes());
            body.extend_from_slice(&(value.len() as u16).to_be_bytes());
            body.extend_from_slice(value);
            body.resize(body.len().div_ceil(4) * 4, 0);
        }
        let mut datagram = vec![0x00, 0x01];
        datagram.extend_from_slice(&(body.len() as u16).to_be_bytes());
        datagram.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        datagram.extend_from_slice(&[7; 12]);
        datagram.extend_from_slice(&body);
        datagram
    }

    #[test]
    fn a_binding_request_names_the_connection_it_is_for() {
        let request = stun(&[(0x0024, &[0, 0, 0, 1]), (0x0006, b"ourufrag:theirs")]);
        assert_eq!(stun_target_ufrag(&request), Some("ourufrag"));
        // Padding after an odd-length attribute is skipped.
        let padded = stun(&[(0x8022, b"abc"), (0x0006, b"ufrag2:x")]);
        assert_eq!(stun_target_ufrag(&padded), Some("ufrag2"));
    }

    #[test]
    fn media_truncated_stun_and_stun_without_username_name_nothing() {
        assert_eq!(stun_target_ufrag(&stun(&[(0x0024, &[0, 0, 0, 1])])), None);
        // RTP (version 2) and DTLS (content type 20–63) never look like STUN.
        assert_eq!(stun_target_ufrag(&[0x80; 40]), None);
        assert_eq!(stun_target_ufrag(&[22; 40]), None);
        let mut truncated = stun(&[(0x0006, b"ourufrag:theirs")]);
        truncated.truncate(26);
        assert_eq!(stun_target_ufrag(&truncated), None);
        assert_eq!(stun_target_ufrag(&stun(&[(0x0006, b":x")])), None);
    }
}
