//! SFTP below an allowed `sftp` subsystem: every operation is an action of its own,
//! decided on the path the upstream server resolves (`..` and symbolic links followed),
//! recorded, and sent on with that resolved path.
//!
//! Packets are read with russh-sftp's types. A client packet is sent on only as the
//! gateway re-encodes what it parsed, and only when that re-encoding is byte for byte the
//! packet the client sent: a path that is not UTF-8, trailing bytes, anything the parse
//! did not keep exactly is refused rather than read one way here and another upstream.

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};
use russh::{ChannelMsg, ChannelWriteHalf, client};
use russh_sftp::protocol::{
    Extended, File, Name, OpenFlags, Packet, RealPath, Rename, Status, StatusCode,
};

use crate::policy::types::{Action, SftpOp, SftpRequest};
use crate::proxy::Verdict;
use crate::record::EventKind;

use super::channel::ChannelTask;
use super::pump::Inbox;

/// The largest SFTP packet either side may send (OpenSSH's own limit).
const MAX_PACKET: usize = 256 * 1024 + 1024;

/// Request ids from here up are the gateway's own (its path resolutions); a client
/// request with one is refused.
const GATEWAY_IDS: u32 = 0xffff_0000;

/// Why an SFTP relay stopped.
pub(super) enum SftpEnd {
    Done,
    Cut(String),
}

/// What the gateway knows of an open handle.
struct HandleInfo {
    path: String,
    writable: bool,
    bytes_read: u64,
    bytes_written: u64,
}

/// A request sent upstream whose answer the gateway reads on its way back.
enum Pending {
    Open { path: String, writable: bool },
    Read { handle: String },
    Close { handle: String },
}

/// Frames a byte stream into SFTP packets (length included).
#[derive(Default)]
struct Framer {
    buf: BytesMut,
}

impl Framer {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole packet; an error for a length past `MAX_PACKET`.
    fn next(&mut self) -> Result<Option<Bytes>, String> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(format!("an SFTP packet of {len} bytes is out of bounds"));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(4 + len).freeze()))
    }
}

/// A packet's request id, read from its bytes: the answers' types (`Name`, `Status`,
/// …) carry one too, which russh-sftp's `get_request_id` reads only for requests.
/// `None` for `INIT` and `VERSION`, which have none.
fn packet_id(packet: &Bytes) -> Option<u32> {
    const INIT: u8 = 1;
    const VERSION: u8 = 2;
    match packet.get(4) {
        Some(&INIT | &VERSION) | None => None,
        Some(_) => packet
            .get(5..9)
            .map(|id| u32::from_be_bytes(id.try_into().expect("4 bytes"))),
    }
}

fn decode(packet: &Bytes) -> Option<Packet> {
    let mut body = packet.slice(4..);
    Packet::try_from(&mut body).ok()
}

fn encode(packet: Packet) -> Option<Bytes> {
    Bytes::try_from(packet).ok()
}

/// The upstream side: its channel and the packets read from it.
struct Upstream {
    channel: ChannelWriteHalf<client::Msg>,
    inbox: Inbox,
    framer: Framer,
    closed: bool,
    /// The subsystem's exit status, passed on when the channel ends (scp checks it).
    exit_status: Option<u32>,
}

/// Relays an SFTP session between `task`'s client channel and `up`, deciding each
/// operation.
pub(super) async fn relay(
    task: &mut ChannelTask,
    inbox: Inbox,
    up: ChannelWriteHalf<client::Msg>,
) -> SftpEnd {
    let mut relay = Relay {
        up: Upstream {
            channel: up,
            inbox,
            framer: Framer::default(),
            closed: false,
            exit_status: None,
        },
        from_client: Framer::default(),
        handles: HashMap::new(),
        pending: HashMap::new(),
        next_id: GATEWAY_IDS,
    };
    let end = relay.run(task).await;
    for (_, handle) in relay.handles.drain() {
        record_transfer(task, &handle).await;
    }
    if let Some(status) = relay.up.exit_status {
        let _ = task.client().exit_status(status).await;
    }
    let _ = relay.up.channel.close().await;
    end
}

struct Relay {
    up: Upstream,
    from_client: Framer,
    handles: HashMap<String, HandleInfo>,
    pending: HashMap<u32, Pending>,
    next_id: u32,
}

impl Relay {
    async fn run(&mut self, task: &mut ChannelTask) -> SftpEnd {
        let mut cut = task.cut_signal();
        loop {
            tokio::select! {
                msg = task.client_in().recv() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        self.from_client.push(&data);
                        loop {
                            match self.from_client.next() {
                                Ok(Some(packet)) => {
                                    if let Err(end) = self.client_packet(task, packet).await {
                                        return end;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::info!(error = %e, "SFTP client broke the protocol");
                                    return SftpEnd::Done;
                                }
                            }
                        }
                    }
                    Some(ChannelMsg::Eof) => {
                        let _ = self.up.channel.eof().await;
                    }
                    None | Some(ChannelMsg::Close) => return SftpEnd::Done,
                    Some(_) => {}
                },
                packet = self.upstream_packet() => match packet {
                    Some(packet) => {
                        if self.upstream_answer(task, packet).await.is_err() {
                            return SftpEnd::Done;
                        }
                    }
                    None => return SftpEnd::Done,
                },
                reason = cut.ended() => return SftpEnd::Cut(reason),
            }
        }
    }

    /// The next whole packet from the upstream; `None` once it is gone.
    async fn upstream_packet(&mut self) -> Option<Bytes> {
        loop {
            match self.up.framer.next() {
                Ok(Some(packet)) => return Some(packet),
                Ok(None) if self.up.closed => return None,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "SFTP upstream broke the protocol");
                    return None;
                }
            }
            match self.up.inbox.recv().await {
                Some(ChannelMsg::Data { data }) => self.up.framer.push(&data),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    self.up.exit_status = Some(exit_status);
                }
                // The exit status comes after EOF: read on until the channel closes.
                None | Some(ChannelMsg::Close) => self.up.closed = true,
                Some(_) => {}
            }
        }
    }

    /// Notes what an upstream answer says about handles and sizes, and passes it on.
    async fn upstream_answer(&mut self, task: &mut ChannelTask, packet: Bytes) -> Result<(), ()> {
        const HANDLE: u8 = 102;
        const DATA: u8 = 103;
        if let Some(id) = packet_id(&packet) {
            match (self.pending.remove(&id), packet[4]) {
                (Some(Pending::Open { path, writable }), HANDLE) => {
                    if let Some(Packet::Handle(h)) = decode(&packet) {
                        let info = HandleInfo {
                            path,
                            writable,
                            bytes_read: 0,
                            bytes_written: 0,
                        };
                        self.handles.insert(h.handle, info);
                    }
                }
                // Counted from the data's length field: decoding would copy the data.
                (Some(Pending::Read { handle }), DATA) => {
                    let len = packet
                        .get(9..13)
                        .map_or(0, |n| u32::from_be_bytes(n.try_into().expect("4 bytes")));
                    if let Some(info) = self.handles.get_mut(&handle) {
                        info.bytes_read += u64::from(len);
                    }
                }
                (Some(Pending::Close { handle }), _) => {
                    if let Some(info) = self.handles.remove(&handle) {
                        record_transfer(task, &info).await;
                    }
                }
                _ => {}
            }
        }
        task.client().data(&packet[..]).await.map_err(drop)
    }

    /// Decides one client packet: answers it (a refusal) or sends it on.
    async fn client_packet(
        &mut self,
        task: &mut ChannelTask,
        packet: Bytes,
    ) -> Result<(), SftpEnd> {
        let Some(decoded) = decode(&packet) else {
            return self
                .answer_unreadable(task, &packet, "the gateway cannot read this SFTP packet")
                .await;
        };
        // Sent on only as the gateway reads it: the re-encoding must be the packet.
        let exact = decode(&packet)
            .and_then(encode)
            .is_some_and(|again| again == packet);
        let id = decoded.get_request_id();
        if !exact {
            return self
                .deny(task, id, "the SFTP packet holds bytes the gateway does not read as the server would (a name that is not UTF-8, or trailing bytes)")
                .await;
        }
        if id >= GATEWAY_IDS && !matches!(decoded, Packet::Init(_)) {
            return self
                .deny(task, id, "request ids from 0xffff0000 up are the gateway's")
                .await;
        }
        let forward = match decoded {
            Packet::Init(init) => Packet::Init(init),
            Packet::Open(mut open) => {
                let writable = open.pflags.intersects(
                    OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::CREATE | OpenFlags::TRUNCATE,
                );
                let op = if writable {
                    SftpOp::OpenWrite
                } else {
                    SftpOp::OpenRead
                };
                if !self.gate(task, id, op, &mut open.filename, true).await? {
                    return Ok(());
                }
                let path = open.filename.clone();
                self.pending.insert(id, Pending::Open { path, writable });
                Packet::Open(open)
            }
            Packet::OpenDir(mut open) => {
                if !self
                    .gate(task, id, SftpOp::ReadDir, &mut open.path, true)
                    .await?
                {
                    return Ok(());
                }
                let path = open.path.clone();
                let writable = false;
                self.pending.insert(id, Pending::Open { path, writable });
                Packet::OpenDir(open)
            }
            // Operations that follow a final symbolic link are decided where it leads;
            // those on a link itself, or on a name that may not exist yet, on its
            // resolved directory and its own name.
            Packet::Stat(mut p) => {
                if !self.gate(task, id, SftpOp::Stat, &mut p.path, true).await? {
                    return Ok(());
                }
                Packet::Stat(p)
            }
            Packet::Lstat(mut p) => {
                if !self
                    .gate(task, id, SftpOp::Stat, &mut p.path, false)
                    .await?
                {
                    return Ok(());
                }
                Packet::Lstat(p)
            }
            Packet::SetStat(mut p) => {
                if !self
                    .gate(task, id, SftpOp::Setstat, &mut p.path, true)
                    .await?
                {
                    return Ok(());
                }
                Packet::SetStat(p)
            }
            Packet::Remove(mut p) => {
                if !self
                    .gate(task, id, SftpOp::Remove, &mut p.filename, false)
                    .await?
                {
                    return Ok(());
                }
                Packet::Remove(p)
            }
            Packet::MkDir(mut p) => {
                if !self
                    .gate(task, id, SftpOp::Mkdir, &mut p.path, false)
                    .await?
                {
                    return Ok(());
                }
                Packet::MkDir(p)
            }
            Packet::RmDir(mut p) => {
                if !self
                    .gate(task, id, SftpOp::Rmdir, &mut p.path, false)
                    .await?
                {
                    return Ok(());
                }
                Packet::RmDir(p)
            }
            Packet::ReadLink(mut p) => {
                if !self
                    .gate(task, id, SftpOp::Readlink, &mut p.path, false)
                    .await?
                {
                    return Ok(());
                }
                Packet::ReadLink(p)
            }
            Packet::RealPath(mut p) => {
                if !self
                    .gate(task, id, SftpOp::Realpath, &mut p.path, true)
                    .await?
                {
                    return Ok(());
                }
                Packet::RealPath(p)
            }
            Packet::Rename(rename) => {
                let (Some(old), Some(new)) = (
                    self.resolve(task, &rename.oldpath, false).await?,
                    self.resolve(task, &rename.newpath, false).await?,
                ) else {
                    return self
                        .deny(task, id, "the server cannot resolve this path")
                        .await;
                };
                if !self
                    .decide(task, id, SftpOp::Rename, &old, Some(&new))
                    .await?
                {
                    return Ok(());
                }
                Packet::Rename(Rename {
                    id,
                    oldpath: old,
                    newpath: new,
                })
            }
            Packet::Symlink(mut link) => {
                // The link's target is text the server stores as it is; only the
                // link's own place is resolved.
                let Some(path) = self.resolve(task, &link.linkpath, false).await? else {
                    return self
                        .deny(task, id, "the server cannot resolve this path")
                        .await;
                };
                if !self
                    .decide(task, id, SftpOp::Symlink, &path, Some(&link.targetpath))
                    .await?
                {
                    return Ok(());
                }
                link.linkpath = path;
                Packet::Symlink(link)
            }
            Packet::Read(read) => {
                if !self.handles.contains_key(&read.handle) {
                    return self
                        .deny(task, id, "not a handle this session opened")
                        .await;
                }
                self.pending.insert(
                    id,
                    Pending::Read {
                        handle: read.handle.clone(),
                    },
                );
                Packet::Read(read)
            }
            Packet::Write(write) => {
                let Some(info) = self.handles.get_mut(&write.handle).filter(|h| h.writable) else {
                    return self
                        .deny(task, id, "the handle was not opened for writing")
                        .await;
                };
                info.bytes_written += write.data.len() as u64;
                Packet::Write(write)
            }
            Packet::FSetStat(set) => {
                let Some(info) = self.handles.get(&set.handle) else {
                    return self
                        .deny(task, id, "not a handle this session opened")
                        .await;
                };
                let path = info.path.clone();
                if !self.decide(task, id, SftpOp::Setstat, &path, None).await? {
                    return Ok(());
                }
                Packet::FSetStat(set)
            }
            Packet::Close(close) => {
                self.pending.insert(
                    id,
                    Pending::Close {
                        handle: close.handle.clone(),
                    },
                );
                Packet::Close(close)
            }
            Packet::Fstat(stat) => {
                if !self.handles.contains_key(&stat.handle) {
                    return self
                        .deny(task, id, "not a handle this session opened")
                        .await;
                }
                Packet::Fstat(stat)
            }
            Packet::ReadDir(read) => {
                if !self.handles.contains_key(&read.handle) {
                    return self
                        .deny(task, id, "not a handle this session opened")
                        .await;
                }
                Packet::ReadDir(read)
            }
            Packet::Extended(extended) => match self.extended(task, extended).await? {
                Some(packet) => packet,
                None => return Ok(()),
            },
            // Answers are the server's to send.
            _ => return self.deny(task, id, "not an SFTP request").await,
        };
        match encode(forward) {
            Some(bytes) => self.send_up(&bytes).await,
            None => {
                self.deny(task, id, "the gateway cannot encode this request")
                    .await
            }
        }
    }

    /// OpenSSH's extensions the gateway can decide; the rest are refused.
    async fn extended(
        &mut self,
        task: &mut ChannelTask,
        extended: Extended,
    ) -> Result<Option<Packet>, SftpEnd> {
        let id = extended.id;
        let mut data = Bytes::from(extended.data.clone());
        let mut strings = || read_string(&mut data);
        match extended.request.as_str() {
            "posix-rename@openssh.com" | "hardlink@openssh.com" => {
                let (Some(old), Some(new)) = (strings(), strings()) else {
                    self.deny(task, id, "malformed extended request").await?;
                    return Ok(None);
                };
                let (Some(old), Some(new)) = (
                    self.resolve(task, &old, false).await?,
                    self.resolve(task, &new, false).await?,
                ) else {
                    self.deny(task, id, "the server cannot resolve this path")
                        .await?;
                    return Ok(None);
                };
                let (op, path, target) = if extended.request.starts_with("posix-rename") {
                    (SftpOp::Rename, old.clone(), new.clone())
                } else {
                    // A hard link is a new name (`new`) for an existing file (`old`).
                    (SftpOp::Symlink, new.clone(), old.clone())
                };
                if !self.decide(task, id, op, &path, Some(&target)).await? {
                    return Ok(None);
                }
                let mut out = BytesMut::new();
                write_string(&mut out, &old);
                write_string(&mut out, &new);
                Ok(Some(Packet::Extended(Extended {
                    id,
                    request: extended.request,
                    data: out.to_vec(),
                })))
            }
            "statvfs@openssh.com" | "lsetstat@openssh.com" | "expand-path@openssh.com" => {
                let Some(raw) = strings() else {
                    self.deny(task, id, "malformed extended request").await?;
                    return Ok(None);
                };
                let rest = data.clone();
                let (op, follow) = match extended.request.as_str() {
                    "statvfs@openssh.com" => (SftpOp::Stat, true),
                    "lsetstat@openssh.com" => (SftpOp::Setstat, false),
                    _ => (SftpOp::Realpath, true),
                };
                let Some(path) = self.resolve(task, &raw, follow).await? else {
                    self.deny(task, id, "the server cannot resolve this path")
                        .await?;
                    return Ok(None);
                };
                if !self.decide(task, id, op, &path, None).await? {
                    return Ok(None);
                }
                let mut out = BytesMut::new();
                write_string(&mut out, &path);
                out.extend_from_slice(&rest);
                Ok(Some(Packet::Extended(Extended {
                    id,
                    request: extended.request,
                    data: out.to_vec(),
                })))
            }
            "fsync@openssh.com" => {
                let writable = strings()
                    .and_then(|h| self.handles.get(&h))
                    .is_some_and(|h| h.writable);
                if !writable {
                    self.deny(task, id, "the handle was not opened for writing")
                        .await?;
                    return Ok(None);
                }
                Ok(Some(Packet::Extended(extended)))
            }
            // Facts about the server, not about any file.
            "limits@openssh.com" | "fstatvfs@openssh.com" => Ok(Some(Packet::Extended(extended))),
            other => {
                let reason = format!("the SFTP extension `{other}` is not relayed through Airlock");
                self.deny(task, id, &reason).await?;
                Ok(None)
            }
        }
    }

    /// The path as the upstream server resolves it: the whole path (`follow`, for
    /// operations that follow a final symbolic link), or its directory with the final
    /// name kept (for operations on a link itself, or a name that does not exist yet).
    /// `None` when the server cannot resolve it.
    async fn resolve(
        &mut self,
        task: &mut ChannelTask,
        path: &str,
        follow: bool,
    ) -> Result<Option<String>, SftpEnd> {
        let trimmed = path.trim_end_matches('/');
        let (dir, name) = match trimmed.rsplit_once('/') {
            Some(("", name)) => ("/", name),
            Some((dir, name)) => (dir, name),
            None => (".", trimmed),
        };
        let whole = follow || name.is_empty() || name == "." || name == "..";
        if whole
            && let Some(resolved) = self
                .realpath(task, if path.is_empty() { "." } else { path })
                .await?
        {
            return Ok(Some(resolved));
        }
        if name.is_empty() || name == "." || name == ".." {
            return Ok(None);
        }
        Ok(self
            .realpath(task, dir)
            .await?
            .map(|dir| format!("{}/{name}", dir.trim_end_matches('/'))))
    }

    /// Asks the upstream for REALPATH, passing on its other answers meanwhile.
    async fn realpath(
        &mut self,
        task: &mut ChannelTask,
        path: &str,
    ) -> Result<Option<String>, SftpEnd> {
        let id = self.next_id;
        self.next_id = if self.next_id == u32::MAX {
            GATEWAY_IDS
        } else {
            self.next_id + 1
        };
        let request = encode(Packet::RealPath(RealPath {
            id,
            path: path.to_string(),
        }))
        .ok_or(SftpEnd::Done)?;
        self.send_up(&request).await?;
        loop {
            let Some(packet) = self.upstream_packet().await else {
                return Err(SftpEnd::Done);
            };
            if packet_id(&packet) == Some(id)
                && let Some(decoded) = &decode(&packet)
            {
                return Ok(match decoded {
                    Packet::Name(Name { files, .. }) => match files.as_slice() {
                        [File { filename, .. }] => Some(filename.clone()),
                        _ => None,
                    },
                    _ => None,
                });
            }
            self.upstream_answer(task, packet)
                .await
                .map_err(|_| SftpEnd::Done)?;
        }
    }

    /// Resolves `path` on the server and decides `op` on the resolved path, which
    /// replaces `path` (it is what is sent on). False once a refusal has been answered.
    async fn gate(
        &mut self,
        task: &mut ChannelTask,
        id: u32,
        op: SftpOp,
        path: &mut String,
        follow: bool,
    ) -> Result<bool, SftpEnd> {
        let Some(resolved) = self.resolve(task, path, follow).await? else {
            self.deny(task, id, "the server cannot resolve this path")
                .await?;
            return Ok(false);
        };
        *path = resolved;
        let path = path.as_str();
        if op == SftpOp::OpenRead
            && let Some(reason) = task.unmaskable_read().await
        {
            let verdict = Verdict::refused_by_gateway((reason.clone(), None));
            if !record_operation(task, Some(op), Some(path), None, &verdict).await {
                return Err(SftpEnd::Cut("record unavailable".into()));
            }
            let message = format!("airlock: denied: {reason}");
            self.answer(task, id, StatusCode::PermissionDenied, &message)
                .await?;
            return Ok(false);
        }
        self.decide(task, id, op, path, None).await
    }

    /// Decides one operation and records it; a refusal is answered to the client.
    /// True when allowed.
    async fn decide(
        &mut self,
        task: &mut ChannelTask,
        id: u32,
        op: SftpOp,
        path: &str,
        target: Option<&str>,
    ) -> Result<bool, SftpEnd> {
        let request = SftpRequest {
            op,
            path: path.to_string(),
            target_path: target.map(str::to_string),
        };
        let key = format!("sftp\0{}\0{path}\0{}", op_name(op), target.unwrap_or(""));
        let verdict = task
            .check(&key, Action::Sftp(request))
            .await
            .map_err(SftpEnd::Cut)?;
        if !record_operation(task, Some(op), Some(path), target, &verdict).await {
            return Err(SftpEnd::Cut("record unavailable".into()));
        }
        if let Some((reason, _)) = &verdict.denial {
            self.answer(
                task,
                id,
                StatusCode::PermissionDenied,
                &format!("airlock: denied: {reason}"),
            )
            .await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// A refusal by the gateway itself, recorded and answered.
    async fn deny(&mut self, task: &mut ChannelTask, id: u32, reason: &str) -> Result<(), SftpEnd> {
        let verdict = Verdict::refused_by_gateway((reason.to_string(), None));
        if !record_operation(task, None, None, None, &verdict).await {
            return Err(SftpEnd::Cut("record unavailable".into()));
        }
        self.answer(
            task,
            id,
            StatusCode::PermissionDenied,
            &format!("airlock: denied: {reason}"),
        )
        .await
    }

    async fn answer_unreadable(
        &mut self,
        task: &mut ChannelTask,
        packet: &Bytes,
        reason: &str,
    ) -> Result<(), SftpEnd> {
        match packet_id(packet) {
            Some(id) => self.deny(task, id, reason).await,
            None => Err(SftpEnd::Done),
        }
    }

    async fn answer(
        &mut self,
        task: &mut ChannelTask,
        id: u32,
        code: StatusCode,
        message: &str,
    ) -> Result<(), SftpEnd> {
        let status = Packet::Status(Status {
            id,
            status_code: code,
            error_message: message.chars().take(512).collect(),
            language_tag: "en".into(),
        });
        let bytes = encode(status).ok_or(SftpEnd::Done)?;
        task.client()
            .data(&bytes[..])
            .await
            .map_err(|_| SftpEnd::Done)
    }

    async fn send_up(&mut self, bytes: &Bytes) -> Result<(), SftpEnd> {
        self.up
            .channel
            .data(&bytes[..])
            .await
            .map_err(|_| SftpEnd::Done)
    }
}

/// An SSH string (u32 length, bytes) from an extended request's data, as UTF-8.
fn read_string(data: &mut Bytes) -> Option<String> {
    if data.remaining() < 4 {
        return None;
    }
    let len = data.get_u32() as usize;
    if data.remaining() < len {
        return None;
    }
    String::from_utf8(data.split_to(len).to_vec()).ok()
}

fn write_string(out: &mut BytesMut, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// The operation's name as the WIT contract and the record spell it.
fn op_name(op: SftpOp) -> &'static str {
    match op {
        SftpOp::OpenRead => "open-read",
        SftpOp::OpenWrite => "open-write",
        SftpOp::ReadDir => "read-dir",
        SftpOp::Stat => "stat",
        SftpOp::Setstat => "setstat",
        SftpOp::Remove => "remove",
        SftpOp::Rename => "rename",
        SftpOp::Mkdir => "mkdir",
        SftpOp::Rmdir => "rmdir",
        SftpOp::Readlink => "readlink",
        SftpOp::Symlink => "symlink",
        SftpOp::Realpath => "realpath",
    }
}

/// Records one decided operation (`sftp.operation`) before it is sent on.
async fn record_operation(
    task: &ChannelTask,
    op: Option<SftpOp>,
    path: Option<&str>,
    target: Option<&str>,
    verdict: &Verdict,
) -> bool {
    let mut detail = serde_json::json!({
        "session": task.session_id(),
        "channel": task.channel_number(),
        "op": op.map(op_name),
        "path": path,
        "target_path": target,
        "verdict": if verdict.denial.is_some() { "deny" } else { "allow" },
        "decided_by": verdict.decided_by,
        "reason": verdict.denial.as_ref().map(|d| &d.0),
    });
    if verdict.decided_by == "policy" {
        detail["bundle"] = verdict.bundle.clone().into();
        detail["votes"] = verdict.votes.clone().into();
    }
    task.record(EventKind::SftpOperation, detail).await
}

/// What moved through one handle, recorded with the next entry once it closes.
async fn record_transfer(task: &ChannelTask, handle: &HandleInfo) {
    let detail = serde_json::json!({
        "session": task.session_id(),
        "channel": task.channel_number(),
        "path": handle.path,
        "bytes_read": handle.bytes_read,
        "bytes_written": handle.bytes_written,
    });
    task.result(EventKind::SftpTransfer, detail).await;
}
