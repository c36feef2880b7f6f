//! Where policy decisions run: a few dedicated threads, never the async runtime's.
//!
//! A Wasm call can use its whole deadline. Run on the runtime's workers, a burst of
//! such calls from one agent held every other agent's grants, statements and the
//! health endpoint behind it. Here every decision is a job on a bounded pool, and the
//! pool is fair between agents: each agent has a queue of its own, and the workers take
//! the agents in turn, so one agent's backlog delays another agent's decision by at
//! most the jobs already running. Each agent may have only so many decisions queued or
//! running; more wait for one of them to finish (off the pool, costing no worker). A
//! decision must start within its deadline, counted from when it was asked for, so
//! time spent waiting counts; past it, the decision is refused, which every caller
//! turns into a denial: fail closed, never wait without bound.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Why a decision was not made. Each is a denial for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "agent `{agent}` kept {limit} policy decisions queued or running (the gateway's per-agent bound) for the whole {deadline:?} deadline of this one; denied, try again when they finish"
    )]
    AgentBusy {
        agent: Arc<str>,
        limit: usize,
        deadline: Duration,
    },
    #[error(
        "the policy host did not start this decision within its {0:?} deadline (the gateway is busy); denied (fail closed)"
    )]
    Deadline(Duration),
    #[error("a policy decision failed inside the gateway; denied (fail closed)")]
    Panicked,
    #[error("the policy host is shutting down; denied")]
    Stopped,
}

type Job = Box<dyn FnOnce() + Send>;

/// The bounded, agent-fair pool every policy decision runs on.
pub struct DecisionPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    /// Each agent's bound on decisions queued or running, while it has any.
    slots: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    per_agent: usize,
    deadline: Duration,
    refused_busy: AtomicU64,
    refused_late: AtomicU64,
}

/// Counts since the pool started, for the operator's health view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Decisions refused because their agent had its bound in flight throughout.
    pub refused_agent_busy: u64,
    /// Decisions refused because no worker took them before their deadline.
    pub refused_deadline: u64,
}

#[derive(Default)]
struct State {
    /// Each agent's queued jobs; an agent is here exactly when it has one.
    queued: HashMap<Arc<str>, VecDeque<Job>>,
    /// Agents with a queued job, in the order they get a worker.
    turns: VecDeque<Arc<str>>,
    stopping: bool,
}

/// One of an agent's slots, held until its job has run (or was dropped unrun).
struct Slot {
    shared: Arc<Shared>,
    agent: Arc<str>,
    semaphore: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut slots = self.shared.slots();
        // Only the map and this slot hold it: nobody runs or waits for this agent.
        if Arc::strong_count(&self.semaphore) == 2 {
            slots.remove(&self.agent);
        }
    }
}

impl DecisionPool {
    /// Starts `workers` threads. Each agent may have `per_agent` decisions queued or
    /// running; each decision must start within `deadline` of being asked for, and
    /// gets what is left of it to finish.
    pub fn new(workers: usize, per_agent: usize, deadline: Duration) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            work: Condvar::new(),
            slots: Mutex::default(),
            per_agent: per_agent.max(1),
            deadline,
            refused_busy: AtomicU64::new(0),
            refused_late: AtomicU64::new(0),
        });
        let threads = (0..workers.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("airlock-policy-{i}"))
                    .spawn(move || shared.work())
                    .expect("cannot start a policy worker thread")
            })
            .collect();
        DecisionPool { shared, threads }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            refused_agent_busy: self.shared.refused_busy.load(Ordering::Relaxed),
            refused_deadline: self.shared.refused_late.load(Ordering::Relaxed),
        }
    }

    /// Runs `decide` on the pool on behalf of `agent`, handing it the decision's
    /// deadline. A caller that stops waiting (a closed connection) leaves a queued job
    /// to be skipped, not run.
    pub async fn run<R: Send + 'static>(
        &self,
        agent: &str,
        decide: impl FnOnce(Instant) -> R + Send + 'static,
    ) -> Result<R, Refusal> {
        let total = self.shared.deadline;
        let deadline = Instant::now() + total;
        let slot = self.shared.slot(agent, deadline).await?;
        let (tx, rx) = oneshot::channel();
        let shared = self.shared.clone();
        let job: Job = Box::new(move || {
            // Released when the job is done, or dropped unrun.
            let _slot = slot;
            if tx.is_closed() {
                return;
            }
            if Instant::now() >= deadline {
                shared.refused_late.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Err(Refusal::Deadline(total)));
                return;
            }
            // A panic is a bug in the gateway, not the module (module faults are
            // values); it must not take a worker with it.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| decide(deadline)))
                .map_err(|_| Refusal::Panicked);
            let _ = tx.send(result);
        });
        self.shared.submit(agent, job)?;
        rx.await.unwrap_or(Err(Refusal::Stopped))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Neither lock is held while a job runs or a caller waits, so a poisoned lock
        // means a bug in this file; the state is consistent at every unlock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Semaphore>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits, until `deadline` at the latest, for one of `agent`'s slots.
    async fn slot(self: &Arc<Self>, agent: &str, deadline: Instant) -> Result<Slot, Refusal> {
        let (agent, semaphore) = {
            let mut slots = self.slots();
            match slots.get_key_value(agent) {
                Some((agent, semaphore)) => (agent.clone(), semaphore.clone()),
                None => {
                    let agent: Arc<str> = agent.into();
                    let semaphore = Arc::new(Semaphore::new(self.per_agent));
                    slots.insert(agent.clone(), semaphore.clone());
                    (agent, semaphore)
                }
            }
        };
        let mut slot = Slot {
            shared: self.clone(),
            agent,
            semaphore,
            permit: None,
        };
        let acquire = slot.semaphore.clone().acquire_owned();
        match tokio::time::timeout_at(deadline.into(), acquire).await {
            Ok(Ok(permit)) => {
                slot.permit = Some(permit);
                Ok(slot)
            }
            Ok(Err(_closed)) => Err(Refusal::Stopped),
            Err(_elapsed) => {
                self.refused_busy.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::AgentBusy {
                    agent: slot.agent.clone(),
                    limit: self.per_agent,
                    deadline: self.deadline,
                })
            }
        }
    }

    fn submit(&self, agent: &str, job: Job) -> Result<(), Refusal> {
        let mut state = self.lock();
        if state.stopping {
            return Err(Refusal::Stopped);
        }
        let key: Arc<str> = match state.queued.get_key_value(agent) {
            Some((key, _)) => key.clone(),
            None => agent.into(),
        };
        let queue = state.queued.entry(key.clone()).or_default();
        queue.push_back(job);
        if queue.len() == 1 {
            state.turns.push_back(key);
        }
        drop(state);
        self.work.notify_one();
        Ok(())
    }

    fn work(&self) {
        loop {
            let job = {
                let mut state = self.lock();
                let agent = loop {
                    if let Some(agent) = state.turns.pop_front() {
                        break agent;
                    }
                    if state.stopping {
                        return;
                    }
                    state = self
                        .work
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                };
                let queue = state
                    .queued
                    .get_mut(&agent)
                    .expect("an agent in turn has a queue");
                let job = queue.pop_front().expect("an agent in turn has a job");
                if queue.is_empty() {
                    state.queued.remove(&agent);
                } else {
                    // Back of the line: every other waiting agent goes first.
                    state.turns.push_back(agent);
                }
                job
            };
            job();
        }
    }
}

impl Drop for DecisionPool {
    fn drop(&mut self) {
        let dropped: Vec<Job> = {
            let mut state = self.shared.lock();
            state.stopping = true;
            state.turns.clear();
            state.queued.drain().flat_map(|(_, queue)| queue).collect()
        };
        // Dropping a queued job drops its sender: its caller hears `Stopped`.
        drop(dropped);
        self.shared.work.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn runs_a_decision_off_the_calling_thread() {
        let pool = DecisionPool::new(2, 4, Duration::from_secs(5));
        let caller = std::thread::current().id();
        let ran_on = runtime()
            .block_on(pool.run("a", |_| std::thread::current().id()))
            .unwrap();
        assert_ne!(ran_on, caller);
    }

    #[test]
    fn an_agent_past_its_bound_waits_then_is_refused_and_others_are_not() {
        let pool = DecisionPool::new(1, 2, Duration::from_millis(300));
        let release = Arc::new(AtomicBool::new(false));
        runtime().block_on(async {
            let held = hold(&pool, "flood", &release);
            let mut queued = Box::pin(pool.run("flood", |_| ()));
            assert!(futures_poll(&mut queued).is_none());
            // Both of `flood`'s slots are taken for the whole deadline of a third.
            assert_eq!(
                pool.run("flood", |_| ()).await,
                Err(Refusal::AgentBusy {
                    agent: "flood".into(),
                    limit: 2,
                    deadline: Duration::from_millis(300),
                })
            );
            // Another agent is not bound by `flood`'s slots (it queues for the worker).
            let mut other = Box::pin(pool.run("calm", |_| 7));
            assert!(futures_poll(&mut other).is_none());
            release.store(true, Ordering::Relaxed);
            assert_eq!(held.await, Ok(()));
            assert_eq!(other.await, Ok(7));
            let _ = queued.await;
            // Once they finish, the agent may decide again.
            assert_eq!(pool.run("flood", |_| 1).await, Ok(1));
        });
        assert_eq!(pool.stats().refused_agent_busy, 1);
        // A job's slot is released on the worker just after its answer is sent.
        for _ in 0..5000 {
            if pool.shared.slots().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(pool.shared.slots().is_empty(), "idle agents leave no state");
    }

    #[test]
    fn a_burst_over_the_bound_waits_for_a_slot_instead_of_being_refused() {
        let pool = Arc::new(DecisionPool::new(2, 1, Duration::from_secs(5)));
        let results = runtime().block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        pool.run("bursty", move |_| {
                            std::thread::sleep(Duration::from_millis(2));
                            i
                        })
                        .await
                    })
                })
                .collect();
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap());
            }
            results
        });
        assert_eq!(results, (0..8).map(Ok).collect::<Vec<_>>());
        assert_eq!(pool.stats().refused_agent_busy, 0);
    }

    /// Holds the pool's one worker until released; returns once the job is running.
    fn hold(
        pool: &DecisionPool,
        agent: &'static str,
        release: &Arc<AtomicBool>,
    ) -> impl std::future::Future<Output = Result<(), Refusal>> {
        let started = Arc::new(AtomicBool::new(false));
        let (gate, flag) = (release.clone(), started.clone());
        let mut held = Box::pin(pool.run(agent, move |_| {
            flag.store(true, Ordering::Relaxed);
            while !gate.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
        assert!(futures_poll(&mut held).is_none());
        for _ in 0..5000 {
            if started.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            started.load(Ordering::Relaxed),
            "the held job never started"
        );
        held
    }

    #[test]
    fn agents_take_turns() {
        // One worker, held while `flood` queues three jobs and then `calm` one: `calm`
        // waits for one of `flood`'s, not for all of them.
        let pool = DecisionPool::new(1, 8, Duration::from_secs(5));
        let order = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(AtomicBool::new(false));
        runtime().block_on(async {
            let log = |name: &'static str| {
                let order = order.clone();
                move |_| order.lock().unwrap().push(name)
            };
            let held = hold(&pool, "flood", &release);
            let mut jobs: Vec<_> = ["flood-1", "flood-2", "flood-3"]
                .into_iter()
                .map(|name| Box::pin(pool.run("flood", log(name))))
                .collect();
            jobs.push(Box::pin(pool.run("calm", log("calm-1"))));
            for job in &mut jobs {
                assert!(futures_poll(job).is_none());
            }
            release.store(true, Ordering::Relaxed);
            held.await.unwrap();
            for job in jobs {
                job.await.unwrap();
            }
        });
        assert_eq!(
            *order.lock().unwrap(),
            ["flood-1", "calm-1", "flood-2", "flood-3"]
        );
    }

    #[test]
    fn a_decision_that_waited_past_its_deadline_is_refused_not_run() {
        let pool = DecisionPool::new(1, 8, Duration::from_millis(100));
        let ran = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        runtime().block_on(async {
            let held = hold(&pool, "a", &release);
            let flag = ran.clone();
            let mut late = Box::pin(pool.run("b", move |_| flag.store(true, Ordering::Relaxed)));
            assert!(futures_poll(&mut late).is_none());
            std::thread::sleep(Duration::from_millis(150));
            release.store(true, Ordering::Relaxed);
            assert_eq!(
                late.await,
                Err(Refusal::Deadline(Duration::from_millis(100)))
            );
            let _ = held.await;
        });
        assert!(!ran.load(Ordering::Relaxed));
    }

    #[test]
    fn a_panicking_decision_is_refused_and_the_worker_survives() {
        let pool = DecisionPool::new(1, 8, Duration::from_secs(5));
        let rt = runtime();
        assert_eq!(
            rt.block_on(pool.run("a", |_| -> u8 { panic!("bug") })),
            Err(Refusal::Panicked)
        );
        assert_eq!(rt.block_on(pool.run("a", |_| 1)), Ok(1));
    }

    /// Polls a future once: `Some` if it finished.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
