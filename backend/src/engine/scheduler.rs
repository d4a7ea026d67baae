//! Which sequences run in this forward pass? Continuous batching for a decoder.
//!
//! Each [`Scheduler::step`] gives every running sequence that is generating one token, then
//! spends what is left of the step's token budget on prompts (in chunks, so a long prompt
//! never stalls the others' decoding for more than one step), admitting waiting sequences
//! in arrival order while the key/value cache has blocks for them. When a running sequence
//! needs a block and none is free, the most recently admitted sequence is preempted: its
//! blocks are released and it waits again at the front, to recompute its prompt and what it
//! has generated so far. Its sampler keeps its state, so preemption never changes its output.
//!
//! A sequence admitted with a prompt whose first whole blocks another prompt already
//! computed shares those blocks of the cache and starts after them (automatic prefix
//! caching, [`crate::kv_cache`]): a shared system prompt is computed once, not per request.
//!
//! While few sequences run, a decoding sequence may also feed tokens drafted for it by
//! prompt lookup ([`speculation`]): its last token and the draft go through one forward
//! pass as generated tokens, and each position's logits are sampled in turn, as if the
//! draft had not been there, until a sampled token differs from the drafted one. The
//! sampled tokens are the output and the cache keeps only the positions they confirm. Each
//! position's logits are the bits a one-token step would have given (a row's arithmetic
//! depends on its kind, never its batch) and the sampler draws once per emitted token, as
//! without a draft, so speculation never changes an output, greedy or seeded: it only
//! emits several tokens for one pass over the weights when the draft was right.
//!
//! A sequence bound to a format ([`Constraint`]) samples only among the tokens the format
//! allows next (the others' logits masked to minus infinity in a copy) and is never drafted
//! for; the others in its batch are untouched. Log probabilities, when asked for, are taken
//! from the unmasked logits of the position each token was sampled at.
//!
//! The scheduler is synchronous and single-threaded by design: the engine thread owns it and
//! calls `step` in a loop. It never blocks and never talks to clients.

use std::collections::VecDeque;

use super::constraint::Constraint;
use super::sampling::{self, Sampler, SamplingParams, TokenLogprobs};
use super::speculation::{self, MAX_DRAFT};
use super::stats::StepReport;
use super::Finish;
use crate::device::{Device, DeviceError};
use crate::kv_cache::{KvCache, SeqCache};
use crate::model::llama::{Llama, Logits, Step};

/// One generation request, already tokenized and checked against the context length.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// Whether tokens may be drafted for it ([`speculation`]); never changes its output.
    pub speculate: bool,
    /// Log probabilities to report with each token: `Some(k)` for the chosen token's and
    /// the `k` likeliest tokens'.
    pub logprobs: Option<usize>,
    /// The format its reply must follow, if any: tokens outside it are never sampled.
    pub constraint: Option<Constraint>,
}

/// Decoding sequences up to which drafts are fed: each drafted token is a row of the
/// forward pass, nearly free while the pass waits on reading the weights (a few sequences)
/// and a cost once it is busy computing (many).
const SPECULATE_UP_TO: usize = 4;

/// The longest pause in drafting after wrong drafts, in steps.
const MAX_PAUSE: usize = 16;

/// What a step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: u64,
        token: u32,
        /// When the request asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        id: u64,
        finish: Finish,
    },
}

struct Sequence {
    request: Request,
    cache: SeqCache,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Tokens to feed before the next sample: the prompt (after a preemption, the prompt
    /// and everything generated), or the last generated token.
    pending: VecDeque<u32>,
    /// Tokens drafted after the last generated one in this step's feed.
    drafted: usize,
    /// Steps to decode without a draft before trying again, after drafts that were wholly
    /// wrong; and how long the next such pause is (doubling while drafts keep missing).
    pause: usize,
    next_pause: usize,
    /// How many tokens the next draft may have: one more than the last draft kept, up to
    /// [`MAX_DRAFT`], so a text that copies in short runs is not charged for long guesses.
    draft_len: usize,
}

impl Sequence {
    /// Its tokens so far: the prompt, then what it generated.
    fn tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.request.prompt.iter().chain(&self.generated).copied()
    }
}

/// The running and waiting sequences of one model, and its key/value cache.
pub struct Scheduler<'m, D: Device> {
    model: &'m Llama<D>,
    cache: KvCache<D::Storage>,
    /// Tokens per forward pass, decodes and prompt chunks together.
    token_budget: usize,
    eos: Option<u32>,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last is the first to be preempted.
    running: Vec<Sequence>,
    preemptions: u64,
    /// What the last step fed, for [`Scheduler::report`].
    last_prefill: u64,
    last_decode: u64,
    last_preemptions: u64,
    last_drafted: u64,
    last_accepted: u64,
    last_prefix_hits: u64,
    /// Scratch for a constrained sequence's masked logits.
    masked: Vec<f32>,
}

impl<'m, D: Device> Scheduler<'m, D> {
    /// A scheduler over `model` with a cache of `blocks` blocks of `block_size` positions,
    /// running at most `token_budget` tokens per step and stopping sequences at `eos`.
    pub fn new(
        model: &'m Llama<D>,
        blocks: usize,
        block_size: usize,
        token_budget: usize,
        eos: Option<u32>,
    ) -> Result<Self, DeviceError> {
        assert!(token_budget > 0);
        Ok(Scheduler {
            cache: model.new_cache(blocks, block_size)?,
            model,
            token_budget,
            eos,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            last_prefill: 0,
            last_decode: 0,
            last_preemptions: 0,
            last_drafted: 0,
            last_accepted: 0,
            last_prefix_hits: 0,
            masked: Vec::new(),
        })
    }

    /// Queues a request. Its prompt must fit in the whole cache, or it would never run.
    pub fn add(&mut self, request: Request) {
        let room = self.cache.total_blocks() * self.cache.block_size();
        assert!(
            request.prompt.len() + request.max_tokens <= room,
            "a sequence of up to {} tokens in a cache of {room}",
            request.prompt.len() + request.max_tokens
        );
        self.waiting.push_back(Sequence {
            sampler: Sampler::new(request.params.clone()),
            pending: request.prompt.iter().copied().collect(),
            request,
            cache: SeqCache::default(),
            generated: Vec::new(),
            drafted: 0,
            pause: 0,
            next_pause: 1,
            draft_len: MAX_DRAFT,
        });
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences sent back to wait because the cache ran out, since the start.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn cache(&self) -> &KvCache<D::Storage> {
        &self.cache
    }

    /// The queue and cache now, and what the last [`Scheduler::step`] fed.
    pub fn report(&self) -> StepReport {
        StepReport {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_blocks_used: self.cache.total_blocks() - self.cache.free_blocks(),
            kv_blocks_total: self.cache.total_blocks(),
            prefill_tokens: self.last_prefill,
            decode_tokens: self.last_decode,
            preemptions: self.last_preemptions,
            drafted_tokens: self.last_drafted,
            accepted_tokens: self.last_accepted,
            prefix_hit_tokens: self.last_prefix_hits,
        }
    }

    /// Drops a request wherever it is (its client went away), freeing its blocks at once.
    /// False when it is not here (finished already, or never added).
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(at) = self.waiting.iter().position(|s| s.request.id == id) {
            let mut seq = self.waiting.remove(at).expect("found");
            self.cache.release(&mut seq.cache);
            return true;
        }
        if let Some(at) = self.running.iter().position(|s| s.request.id == id) {
            let mut seq = self.running.remove(at);
            self.cache.release(&mut seq.cache);
            return true;
        }
        false
    }

    /// Sends the most recently admitted running sequence back to the front of the queue.
    fn preempt_newest(&mut self) {
        let mut seq = self.running.pop().expect("a running sequence to preempt");
        self.cache.release(&mut seq.cache);
        seq.pending = seq.tokens().collect();
        seq.drafted = 0;
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Drafts tokens for the running sequence at `i`, which is about to decode, into its
    /// pending feed after its last token: none unless few sequences are decoding, the
    /// request allows it, and its text so far suggests some.
    fn draft(&mut self, i: usize, decoding: usize) {
        let seq = &mut self.running[i];
        seq.drafted = 0;
        // A format's mask is known one token at a time, so a constrained reply is not drafted.
        if !seq.request.speculate || seq.request.constraint.is_some() || decoding > SPECULATE_UP_TO
        {
            return;
        }
        if seq.pause > 0 {
            seq.pause -= 1;
            return;
        }
        // The last generated token is sampled from the draft's last position at best, so a
        // draft never takes a sequence past its max_tokens.
        let room = seq.request.max_tokens - seq.generated.len();
        let limit = seq.draft_len.min(room.saturating_sub(1));
        let history: Vec<u32> = seq.tokens().collect();
        let draft = speculation::prompt_lookup(&history, limit);
        seq.drafted = draft.len();
        seq.pending.extend(draft);
    }

    /// Runs one forward pass over the sequences that fit, and samples those that are due.
    pub fn step(&mut self) -> Result<Vec<Event>, DeviceError> {
        let preemptions_before = self.preemptions;
        (self.last_prefill, self.last_decode) = (0, 0);
        (self.last_drafted, self.last_accepted, self.last_prefix_hits) = (0, 0, 0);
        let decoding = self.running.iter().filter(|s| s.pending.len() == 1).count();
        for i in 0..self.running.len() {
            self.running[i].drafted = 0;
            if self.running[i].pending.len() == 1 && !self.running[i].generated.is_empty() {
                self.draft(i, decoding);
            }
        }
        // How many tokens each running sequence feeds this step, by index in `running`.
        let mut feed = vec![0usize; self.running.len()];
        let mut budget = self.token_budget;
        // Decodes first (one token each), then prompt chunks from what budget is left. A
        // sequence whose blocks cannot be reserved preempts the newest, which may be itself
        // (then the pass ends, as it was the last).
        for decodes in [true, false] {
            let mut i = 0;
            while i < self.running.len() {
                let seq = &mut self.running[i];
                let decode = seq.pending.len() == 1 + seq.drafted;
                let take = match (decodes, decode) {
                    (true, true) => seq.pending.len(),
                    (false, false) => seq.pending.len().min(budget),
                    _ => 0,
                };
                if take == 0 {
                    i += 1;
                } else if self.cache.reserve(&mut seq.cache, take) {
                    feed[i] = take;
                    budget = budget.saturating_sub(take);
                    i += 1;
                } else if seq.drafted > 0 {
                    // No room for the draft: decode without it.
                    seq.pending.truncate(1);
                    seq.drafted = 0;
                } else {
                    self.preempt_newest();
                    feed.truncate(self.running.len());
                }
            }
        }
        // Admit waiting sequences in order while budget and blocks allow, each starting
        // after the blocks of its prompt that are cached already.
        while budget > 0 {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            if seq.cache.blocks().is_empty() {
                let shared = self.cache.share_prefix(&mut seq.cache, &seq.request.prompt);
                seq.pending.drain(..shared);
                self.last_prefix_hits += shared as u64;
            }
            let take = seq.pending.len().min(budget);
            if !self.cache.reserve(&mut seq.cache, take) {
                break;
            }
            budget -= take;
            let seq = self.waiting.pop_front().expect("front");
            self.running.push(seq);
            feed.push(take);
        }

        self.last_preemptions = self.preemptions - preemptions_before;
        let inputs: Vec<Vec<u32>> = self
            .running
            .iter_mut()
            .zip(&feed)
            .map(|(seq, &n)| seq.pending.drain(..n).collect())
            .collect();
        for (seq, tokens) in self.running.iter().zip(&inputs) {
            // A decode feeds back the one token sampled last (and any draft after it);
            // anything else is a prompt, or a preempted sequence's recomputation.
            let known = seq.request.prompt.len() + seq.generated.len();
            if tokens.len() == 1 + seq.drafted
                && !seq.generated.is_empty()
                && seq.cache.len() + 1 == known
            {
                self.last_decode += 1;
                self.last_drafted += seq.drafted as u64;
            } else {
                self.last_prefill += tokens.len() as u64;
            }
        }
        let mut steps: Vec<Step<'_>> = self
            .running
            .iter_mut()
            .zip(&inputs)
            .filter(|(_, tokens)| !tokens.is_empty())
            .map(|(seq, tokens)| {
                // Positions from the prompt's length on hold generated tokens, also when a
                // preempted sequence recomputes them.
                let end = seq.cache.len() + tokens.len();
                let generated = end - end.min(seq.request.prompt.len().max(seq.cache.len()));
                Step {
                    seq: &mut seq.cache,
                    tokens,
                    generated,
                    outputs: 1 + seq.drafted,
                }
            })
            .collect();
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self
            .model
            .forward(&mut self.cache, &mut steps, Logits::Last)?;
        drop(steps);
        for seq in &mut self.running {
            self.cache
                .register_prompt(&mut seq.cache, &seq.request.prompt);
        }
        let logits = self.model.device().download(&logits)?;
        let vocab = self.model.config().vocab_size;

        let mut events = Vec::new();
        let mut rows = logits.chunks_exact(vocab);
        let mut finished = Vec::new();
        for (index, (seq, tokens)) in self.running.iter_mut().zip(&inputs).enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let outputs = 1 + seq.drafted;
            let seq_rows: Vec<&[f32]> = rows.by_ref().take(outputs).collect();
            assert_eq!(seq_rows.len(), outputs, "logits for every output asked");
            if !seq.pending.is_empty() {
                // Mid-prompt: the logits of a chunk's last token predict nothing we need.
                continue;
            }
            // Position j's logits follow the token fed at j; draft token j was fed at j + 1.
            let draft = &tokens[tokens.len() - seq.drafted..];
            let id = seq.request.id;
            let mut finish = None;
            let mut confirmed = 0;
            for (j, row) in seq_rows.iter().enumerate() {
                let token = match &mut seq.request.constraint {
                    None => seq.sampler.sample(row),
                    Some(constraint) => {
                        let eos = self.eos;
                        match constraint.mask(row, &mut self.masked).and_then(|()| {
                            let token = seq.sampler.sample(&self.masked);
                            if Some(token) != eos {
                                constraint.accept(token)?;
                            }
                            Ok(token)
                        }) {
                            Ok(token) => token,
                            Err(err) => {
                                // The parser's own failure, not the model's: the reply
                                // ends where it is.
                                tracing::warn!(%err, "a formatted reply ended early");
                                finish = Some(Finish::Stop);
                                break;
                            }
                        }
                    }
                };
                if Some(token) == self.eos {
                    finish = Some(Finish::Stop);
                    break;
                }
                seq.generated.push(token);
                let logprobs = seq
                    .request
                    .logprobs
                    .map(|top| sampling::log_probs(row, token, top));
                events.push(Event::Token {
                    id,
                    token,
                    logprobs,
                });
                if seq.generated.len() >= seq.request.max_tokens {
                    finish = Some(Finish::Length);
                    break;
                }
                if draft.get(j) != Some(&token) {
                    // The next position's logits followed a token that was not chosen.
                    seq.pending.push_back(token);
                    break;
                }
                confirmed += 1;
            }
            self.last_accepted += confirmed as u64;
            // A text that is not copying is not guessed at every step: each wholly wrong
            // draft pauses drafting for twice as long as the last one did.
            if seq.drafted > 0 {
                if confirmed == 0 {
                    seq.pause = seq.next_pause;
                    seq.next_pause = (seq.next_pause * 2).min(MAX_PAUSE);
                } else {
                    seq.next_pause = 1;
                }
                seq.draft_len = (confirmed + 1).min(MAX_DRAFT);
            }
            if seq.drafted > confirmed {
                let fed = seq.cache.len();
                self.cache
                    .truncate(&mut seq.cache, fed - (seq.drafted - confirmed));
            }
            if let Some(finish) = finish {
                events.push(Event::Finished { id, finish });
                finished.push(index);
            }
        }
        self.last_decode += self.last_accepted;
        for index in finished.into_iter().rev() {
            let mut seq = self.running.remove(index);
            self.cache.release(&mut seq.cache);
        }
        Ok(events)
    }
}
