//! One agent session channel: its requests (pty, env, then exec, shell or subsystem)
//! become actions, decided and recorded before an upstream channel is opened for them;
//! then the channel is relayed, its terminal stream recorded as asciicast chunks and
//! the agent's input recorded before it is sent on.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client;
use russh::server::{self, Msg};
use russh::{Channel, ChannelMsg, ChannelWriteHalf, Pty, Sig};

use super::command;
use super::connection::Admitted;
use super::pump::Inbox;
use super::sftp::{self, SftpEnd};
use crate::policy::types::{Action, SshCommand};
use crate::proxy::Verdict;
use crate::proxy::cast::Cast;
use crate::proxy::line_mask::LineMask;
use crate::record::{EventKind, Write};

/// Environment variables an agent may set upstream: locale only. Anything else could
/// change what the remote shell or a program runs (`LD_PRELOAD`, `BASH_ENV`, `PATH`).
const ENV_ALLOWED: &[&str] = &["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ"];

/// How long the upstream may take to open a channel and accept its request.
const UPSTREAM_REPLY: Duration = Duration::from_secs(15);

/// The status an agent sees for a command the gateway did not run.
const DENIED_STATUS: u32 = 126;

/// What the agent asked the channel to run.
enum Request {
    Exec(SshCommand),
    Shell,
    Subsystem(String),
}

impl Request {
    fn name(&self) -> &'static str {
        match self {
            Request::Exec(_) => "exec",
            Request::Shell => "shell",
            Request::Subsystem(_) => "subsystem",
        }
    }
}

/// A pty the agent asked for, applied upstream with the request it precedes.
struct PtyRequest {
    term: String,
    cols: u32,
    rows: u32,
    pix_width: u32,
    pix_height: u32,
    modes: Vec<(Pty, u32)>,
}

pub(super) struct ChannelTask {
    conn: Arc<Admitted>,
    /// What the agent sends, read ahead (see `pump`), and where it is answered.
    client_in: Inbox,
    client: ChannelWriteHalf<Msg>,
    handle: server::Handle,
    pty: Option<PtyRequest>,
    env: Vec<(String, String)>,
}

/// The upstream channel: what it sends, read ahead, and where to write to it.
type Upstream = (Inbox, ChannelWriteHalf<client::Msg>);

/// How a relayed channel ended.
enum Ended {
    Done,
    Cut(String),
    /// Its output could not be masked.
    Withheld(String),
}

impl ChannelTask {
    pub(super) fn new(conn: Arc<Admitted>, client: Channel<Msg>, handle: server::Handle) -> Self {
        let (read, client) = client.split();
        ChannelTask {
            conn,
            client_in: Inbox::read(read),
            client,
            handle,
            pty: None,
            env: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let mut cut = self.conn.cut.clone();
        loop {
            let msg = tokio::select! {
                msg = self.client_in.recv() => msg,
                reason = cut.ended() => {
                    self.say_cut(&reason).await;
                    return;
                }
            };
            let request = match msg {
                None | Some(ChannelMsg::Close) => return,
                Some(ChannelMsg::RequestPty {
                    want_reply,
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                }) => {
                    self.pty = Some(PtyRequest {
                        term,
                        cols: col_width,
                        rows: row_height,
                        pix_width,
                        pix_height,
                        modes: terminal_modes,
                    });
                    self.reply(want_reply, true).await;
                    continue;
                }
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                }) => {
                    if let Some(pty) = &mut self.pty {
                        pty.cols = col_width;
                        pty.rows = row_height;
                    }
                    continue;
                }
                Some(ChannelMsg::SetEnv {
                    want_reply,
                    variable_name,
                    variable_value,
                }) => {
                    let allowed = ENV_ALLOWED.contains(&variable_name.as_str())
                        && variable_value.len() <= 256
                        && !variable_value.contains(['\0', '\n']);
                    if allowed {
                        self.env.push((variable_name, variable_value));
                    } else {
                        let reason = format!(
                            "environment variable {variable_name} is not passed upstream (only {})",
                            ENV_ALLOWED.join(", ")
                        );
                        let refused = Verdict::refused_by_gateway((reason, None));
                        if !self
                            .record_request("env", Some(&variable_name), &refused, None)
                            .await
                        {
                            return;
                        }
                    }
                    self.reply(want_reply, allowed).await;
                    continue;
                }
                Some(ChannelMsg::AgentForward { want_reply }) => {
                    let reason = "agent forwarding is not allowed through Airlock".to_string();
                    let refused = Verdict::refused_by_gateway((reason, None));
                    if !self
                        .record_request("auth-agent-req", None, &refused, None)
                        .await
                    {
                        return;
                    }
                    self.reply(want_reply, false).await;
                    continue;
                }
                Some(ChannelMsg::RequestX11 { want_reply, .. }) => {
                    let reason = "X11 forwarding is not allowed through Airlock".to_string();
                    let refused = Verdict::refused_by_gateway((reason, None));
                    if !self.record_request("x11-req", None, &refused, None).await {
                        return;
                    }
                    self.reply(want_reply, false).await;
                    continue;
                }
                Some(ChannelMsg::Exec { command, .. }) => Request::Exec(command::parse(&command)),
                Some(ChannelMsg::RequestShell { .. }) => Request::Shell,
                Some(ChannelMsg::RequestSubsystem { name, .. }) => Request::Subsystem(name),
                // Data before a request has nowhere to go.
                Some(_) => continue,
            };
            self.start(request).await;
            return;
        }
    }

    async fn reply(&self, want_reply: bool, ok: bool) {
        if want_reply {
            let id = self.client.id();
            let _ = if ok {
                self.handle.channel_success(id).await
            } else {
                self.handle.channel_failure(id).await
            };
        }
    }

    /// Decides the request, records it, and runs it upstream if allowed.
    async fn start(self, request: Request) {
        let verdict = match self.decide(&request).await {
            Ok(verdict) => verdict,
            Err(reason) => {
                self.say_cut(&reason).await;
                return;
            }
        };
        // What the upstream is sent: for a plain command line, the gateway's own
        // quoting of the argvs the policies saw; else the agent's text, which every
        // policy allowed knowing it has shell features.
        let sent = match &request {
            Request::Exec(line) => Some(command::render(line).unwrap_or_else(|| line.text.clone())),
            _ => None,
        };
        let name = match &request {
            Request::Exec(line) => Some(line.text.as_str()),
            Request::Subsystem(name) => Some(name.as_str()),
            Request::Shell => None,
        };
        // Recorded before anything of it reaches the upstream.
        let sent_recorded = if verdict.denial.is_none() {
            sent.as_deref()
        } else {
            None
        };
        if !self
            .record_request(request.name(), name, &verdict, sent_recorded)
            .await
        {
            return;
        }
        if let Some((reason, hint)) = &verdict.denial {
            let mut text = format!("airlock: denied: {reason}\r\n");
            if let Some(hint) = hint {
                text.push_str(&format!("airlock: hint: {hint}\r\n"));
            }
            self.reply(true, true).await;
            let _ = self.client.extended_data(1, text.as_bytes()).await;
            let _ = self.client.exit_status(DENIED_STATUS).await;
            let _ = self.client.eof().await;
            let _ = self.client.close().await;
            return;
        }
        if let Request::Subsystem(name) = &request
            && name != "sftp"
        {
            // Only SFTP is decided below the subsystem (per operation); nothing else
            // is relayed blind.
            let reason = format!(
                "subsystem `{name}` is not relayed through Airlock: its operations cannot be decided one by one"
            );
            self.refuse_open(&reason).await;
            return;
        }
        let upstream = match self.open_upstream(&request, sent.as_deref()).await {
            Ok(upstream) => upstream,
            Err(reason) => {
                self.refuse_open(&reason).await;
                return;
            }
        };
        self.reply(true, true).await;
        match request {
            Request::Subsystem(_) => self.relay_sftp(upstream).await,
            _ => self.relay(upstream, request.name()).await,
        }
    }

    async fn relay_sftp(mut self, (up_in, up): Upstream) {
        if let SftpEnd::Cut(reason) = sftp::relay(&mut self, up_in, up).await {
            self.conn.set_cut(&reason);
            self.say_cut(&reason).await;
        }
        if let Some(core) = self.conn.core.lock().await.as_mut() {
            core.flush_result();
        }
        let _ = self.client.eof().await;
        let _ = self.client.close().await;
    }

    pub(super) fn cut_signal(&self) -> crate::proxy::CutSignal {
        self.conn.cut.clone()
    }

    /// What the agent sends.
    pub(super) fn client_in(&mut self) -> &mut Inbox {
        &mut self.client_in
    }

    /// Where the agent is answered.
    pub(super) fn client(&self) -> &ChannelWriteHalf<Msg> {
        &self.client
    }

    pub(super) fn session_id(&self) -> &str {
        &self.conn.session_id
    }

    pub(super) fn channel_number(&self) -> u32 {
        self.client.id().number()
    }

    /// Why a file may not be read over SFTP here: a masking module applies to the
    /// target, and a file's content (text or not) cannot go through it, so reading it
    /// over SFTP would show what reading it with a command hides. The operator can
    /// allow it with the target label `sftp-unmasked=allow`.
    pub(super) async fn unmaskable_read(&self) -> Option<String> {
        let guard = self.conn.core.lock().await;
        let core = guard.as_ref()?;
        let target = &core.context().target;
        let opted_in = target
            .labels
            .iter()
            .any(|l| l.key == "sftp-unmasked" && l.value == "allow");
        (!opted_in && core.services().policy.current().masks(target)).then(|| {
            "a masking module applies to this target, and a file read over SFTP cannot be masked: read it with an allowed command (its output is masked), or the operator labels the target sftp-unmasked=allow".to_string()
        })
    }

    /// Keeps a result summary, recorded with the next entry.
    pub(super) async fn result(&self, kind: EventKind, detail: serde_json::Value) {
        if let Some(core) = self.conn.core.lock().await.as_mut() {
            core.result(kind, detail);
        }
    }

    async fn decide(&self, request: &Request) -> Result<Arc<Verdict>, String> {
        let (key, action) = match request {
            Request::Exec(line) => (
                format!("exec\0{}", line.text),
                Action::SshExec(line.clone()),
            ),
            Request::Shell => ("shell".to_string(), Action::SshShell),
            Request::Subsystem(name) => (
                format!("subsystem\0{name}"),
                Action::SshSubsystem(name.clone()),
            ),
        };
        self.check(&key, action).await
    }

    /// The verdict on one action (from the session's cache when recent); an error with
    /// the reason when the grant is over.
    pub(super) async fn check(&self, key: &str, action: Action) -> Result<Arc<Verdict>, String> {
        let mut guard = self.conn.core.lock().await;
        let Some(core) = guard.as_mut() else {
            return Err("the session has ended".into());
        };
        if let Some(reason) = core.expired() {
            return Err(reason);
        }
        core.count_actions(1);
        let set = core.services().policy.current();
        Ok(core.check(&set, key, || action, None).await)
    }

    /// Records one channel request with its verdict. False when the record failed:
    /// the session is then cut.
    async fn record_request(
        &self,
        request: &str,
        name: Option<&str>,
        verdict: &Verdict,
        sent: Option<&str>,
    ) -> bool {
        let mut detail = serde_json::json!({
            "session": self.conn.session_id,
            "channel": self.client.id().number(),
            "request": request,
            "verdict": if verdict.denial.is_some() { "deny" } else { "allow" },
            "decided_by": verdict.decided_by,
            "reason": verdict.denial.as_ref().map(|d| &d.0),
        });
        if let Some(name) = name {
            detail["name"] = name.into();
        }
        if let Some(sent) = sent {
            detail["sent"] = sent.into();
        }
        if verdict.decided_by == "policy" {
            detail["bundle"] = verdict.bundle.clone().into();
            detail["votes"] = verdict.votes.clone().into();
        }
        if let Some(pty) = &self.pty
            && request != "env"
        {
            detail["pty"] = serde_json::json!({
                "term": pty.term,
                "cols": pty.cols,
                "rows": pty.rows,
                "upstream": request == "shell" || !self.conn.read_only,
            });
        }
        self.record(EventKind::SshRequest, detail).await
    }

    pub(super) async fn record(&self, kind: EventKind, detail: serde_json::Value) -> bool {
        let mut guard = self.conn.core.lock().await;
        let Some(core) = guard.as_mut() else {
            return false;
        };
        let event = core.event(kind, detail);
        match core.record(Write::event(event)).await {
            Ok(()) => true,
            Err(e) => {
                let reason = format!("record unavailable: {e}");
                tracing::error!(error = %reason, "SSH session cut");
                self.conn.set_cut(&reason);
                false
            }
        }
    }

    /// Tells the agent why nothing ran, on stderr, and closes the channel.
    async fn refuse_open(&self, reason: &str) {
        tracing::warn!(
            channel = self.channel_number(),
            reason,
            "SSH channel request not run"
        );
        self.reply(true, true).await;
        let text = format!("airlock: {reason}\r\n");
        let _ = self.client.extended_data(1, text.as_bytes()).await;
        let _ = self.client.exit_status(255).await;
        let _ = self.client.eof().await;
        let _ = self.client.close().await;
    }

    /// The terminal the upstream channel gets. A read grant's commands get none, even
    /// when the agent asked: with a terminal, `journalctl` or `systemctl status` start a
    /// pager whose `!` runs a shell, and no policy saw that shell.
    fn upstream_pty(&self, request: &Request) -> Option<&PtyRequest> {
        let shell = matches!(request, Request::Shell);
        self.pty.as_ref().filter(|_| shell || !self.conn.read_only)
    }

    async fn open_upstream(
        &self,
        request: &Request,
        sent: Option<&str>,
    ) -> Result<Upstream, String> {
        let open = async {
            let mut up = self
                .conn
                .upstream
                .channel_open_session()
                .await
                .map_err(|e| format!("the upstream refused a channel: {e}"))?;
            if let Some(pty) = self.upstream_pty(request) {
                up.request_pty(
                    false,
                    &pty.term,
                    pty.cols,
                    pty.rows,
                    pty.pix_width,
                    pty.pix_height,
                    &pty.modes,
                )
                .await
                .map_err(|e| e.to_string())?;
            }
            for (name, value) in &self.env {
                up.set_env(false, name.as_str(), value.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            match (request, sent) {
                (Request::Exec(_), Some(sent)) => up.exec(true, sent.as_bytes()).await,
                (Request::Shell, _) => up.request_shell(true).await,
                (Request::Subsystem(name), _) => up.request_subsystem(true, name.as_str()).await,
                _ => return Err("nothing to run".to_string()),
            }
            .map_err(|e| e.to_string())?;
            loop {
                match up.wait().await {
                    Some(ChannelMsg::Success) => {
                        let (read, write) = up.split();
                        return Ok((Inbox::read(read), write));
                    }
                    Some(ChannelMsg::Failure) => {
                        return Err(format!("the upstream refused the {}", request.name()));
                    }
                    None | Some(ChannelMsg::Close) => {
                        return Err("the upstream closed the channel".to_string());
                    }
                    Some(_) => {}
                }
            }
        };
        tokio::time::timeout(UPSTREAM_REPLY, open)
            .await
            .map_err(|_| "the upstream did not answer in time".to_string())?
    }

    /// Relays the channel until either side closes it or the grant ends.
    async fn relay(mut self, (mut up_in, up): Upstream, request: &str) {
        let started = Instant::now();
        let mut cast = Cast::new();
        if let Some(pty) = &self.pty {
            cast.resize(pty.cols, pty.rows);
        }
        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        let mut exit_status = None;
        let mut exit_signal = None;
        let mut cut = self.conn.cut.clone();
        let mut client_open = true;
        let mut upstream_eof = false;
        // A command's output is masked where a module masks the target; a terminal's
        // stream is not (escape sequences, not lines).
        let mut mask = match (request, self.conn.core.lock().await.as_ref()) {
            ("exec", Some(core)) => LineMask::for_target(
                core.services().policy.clone(),
                core.context_now(),
                "text/plain",
                2,
            ),
            _ => None,
        };
        let ended = loop {
            tokio::select! {
                msg = self.client_in.recv(), if client_open => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_in += data.len() as u64;
                        cast.input(&data);
                        // What the agent types reaches the upstream only once recorded.
                        if !self.record_cast(&mut cast).await {
                            break Ended::Cut("record unavailable".into());
                        }
                        if up.data(&data[..]).await.is_err() {
                            break Ended::Done;
                        }
                    }
                    Some(ChannelMsg::Eof) => {
                        let _ = up.eof().await;
                    }
                    Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                        cast.resize(col_width, row_height);
                        let _ = up.window_change(col_width, row_height, pix_width, pix_height).await;
                    }
                    Some(ChannelMsg::Signal { signal }) => {
                        let _ = up.signal(signal).await;
                    }
                    None | Some(ChannelMsg::Close) => {
                        client_open = false;
                        let _ = up.close().await;
                    }
                    Some(_) => {}
                },
                msg = up_in.recv() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_out += data.len() as u64;
                        if let Err(end) = self.pass_out(&mut mask, &mut cast, None, &data, client_open).await {
                            break end;
                        }
                    }
                    Some(ChannelMsg::ExtendedData { data, ext }) => {
                        bytes_out += data.len() as u64;
                        if let Err(end) = self.pass_out(&mut mask, &mut cast, Some(ext), &data, client_open).await {
                            break end;
                        }
                    }
                    Some(ChannelMsg::ExitStatus { exit_status: status }) => {
                        exit_status = Some(status);
                        let _ = self.client.exit_status(status).await;
                        if upstream_eof {
                            let _ = self.client.eof().await;
                        }
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, lang_tag }) => {
                        exit_signal = Some(signal_name_text(&signal_name));
                        let _ = self
                            .handle
                            .exit_signal_request(self.client.id(), signal_name, core_dumped, error_message, lang_tag)
                            .await;
                    }
                    Some(ChannelMsg::Eof) => {
                        // The last, unfinished lines, masked, before the end of output.
                        if let Err(end) = self.pass_rest(&mut mask, &mut cast, client_open).await {
                            break end;
                        }
                        // The agent hears of the end after the exit status: sshd sends
                        // EOF first, and a client that has both EOFs may close the
                        // channel before a status that was relayed a moment later.
                        upstream_eof = true;
                    }
                    None | Some(ChannelMsg::Close) => {
                        if let Err(end) = self.pass_rest(&mut mask, &mut cast, client_open).await {
                            break end;
                        }
                        break Ended::Done;
                    }
                    Some(_) => {}
                },
                reason = cut.ended() => break Ended::Cut(reason),
            }
        };
        let mut withheld = None;
        if let Ended::Withheld(reason) = &ended {
            // The command's output can no longer be masked: it goes no further.
            let _ = up.signal(Sig::HUP).await;
            let _ = up.close().await;
            let text = format!("\r\nairlock: output withheld: {reason}\r\n");
            let _ = self.client.extended_data(1, text.as_bytes()).await;
            withheld = Some(reason.clone());
        }
        if let Ended::Cut(reason) = &ended {
            // The remote command gets its hangup, then the channel goes.
            let _ = up.signal(Sig::HUP).await;
            let _ = up.close().await;
            self.conn.set_cut(reason);
            self.say_cut(reason).await;
        }
        self.record_cast(&mut cast).await;
        let detail = serde_json::json!({
            "session": self.conn.session_id,
            "channel": self.client.id().number(),
            "request": request,
            "exit_status": exit_status,
            "exit_signal": exit_signal,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
            "masked": mask.is_some(),
            "withheld": withheld,
        });
        if let Some(core) = self.conn.core.lock().await.as_mut() {
            core.result(EventKind::SshResult, detail);
        }
        let _ = self.client.eof().await;
        let _ = self.client.close().await;
    }

    /// Passes upstream output (`ext` 1 is stderr) to the agent, masked where it must
    /// be, and into the cast as the agent sees it.
    async fn pass_out(
        &mut self,
        mask: &mut Option<LineMask>,
        cast: &mut Cast,
        ext: Option<u32>,
        data: &[u8],
        client_open: bool,
    ) -> Result<(), Ended> {
        let shown: Cow<[u8]> = match mask {
            Some(mask) => Cow::Owned(
                mask.feed(usize::from(ext.is_some()), data)
                    .await
                    .map_err(|e| Ended::Withheld(e.to_string()))?,
            ),
            None => Cow::Borrowed(data),
        };
        if shown.is_empty() {
            return Ok(());
        }
        if cast.output(&shown) && !self.record_cast(cast).await {
            return Err(Ended::Cut("record unavailable".into()));
        }
        if client_open {
            let _ = match ext {
                Some(ext) => self.client.extended_data(ext, &shown[..]).await,
                None => self.client.data(&shown[..]).await,
            };
        }
        Ok(())
    }

    /// The masked rest of both streams once the output ends.
    async fn pass_rest(
        &mut self,
        mask: &mut Option<LineMask>,
        cast: &mut Cast,
        client_open: bool,
    ) -> Result<(), Ended> {
        let Some(m) = mask else {
            return Ok(());
        };
        let out = m
            .finish(0)
            .await
            .map_err(|e| Ended::Withheld(e.to_string()))?;
        let err = m
            .finish(1)
            .await
            .map_err(|e| Ended::Withheld(e.to_string()))?;
        let mut none = None;
        self.pass_out(&mut none, cast, None, &out, client_open)
            .await?;
        self.pass_out(&mut none, cast, Some(1), &err, client_open)
            .await
    }

    /// Records the cast's waiting events, if any. False when the record failed.
    async fn record_cast(&self, cast: &mut Cast) -> bool {
        let Some(events) = cast.take() else {
            return true;
        };
        let detail = serde_json::json!({
            "session": self.conn.session_id,
            "channel": self.client.id().number(),
            "events": events,
        });
        self.record(EventKind::SshCast, detail).await
    }

    /// Tells the agent on stderr that the grant ended, and closes the channel.
    async fn say_cut(&self, reason: &str) {
        let text = format!("\r\nairlock: the grant ended: {reason}\r\n");
        let _ = self.client.extended_data(1, text.as_bytes()).await;
        let _ = self.client.eof().await;
        let _ = self.client.close().await;
    }
}

fn signal_name_text(signal: &Sig) -> String {
    match signal {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}
