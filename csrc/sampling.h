/* sampling.h: next-token choice on the host from float32 logits, in transformers' order (the engine's
 * choose_tokens): biases (sequence_bias, logit_bias, bans) -> repetition penalty -> presence / frequency penalties
 * (OpenAI's; transformers has none) -> no-repeat n-grams -> min_new_tokens (eos masked) -> forced eos -> begin bans;
 * then fl_sample: temperature -> top-k -> top-p -> min-p -> typical -> epsilon -> eta -> draw. */
#ifndef FL_SAMPLING_H
#define FL_SAMPLING_H
#include "fl_model.h"

typedef struct { uint64_t s[4]; } fl_rng;   /* xoshiro256** */
void fl_rng_seed(fl_rng *r, uint64_t seed);
double fl_rng_uniform(fl_rng *r);            /* [0, 1) */

/* Penalise (in place) every token id in seen[0:n_seen] once, as transformers'
 * RepetitionPenaltyLogitsProcessor: logit < 0 ? logit * p : logit / p. */
void fl_repetition_penalty(float *logits, int vocab, const int32_t *seen, int n_seen, float p, uint8_t *scratch);
/* OpenAI's presence / frequency penalties (in place): each token of out[0:n_out] (the tokens generated so far)
 * lowers its logit by `frequency` for every time it occurs and by `presence` once. scratch: vocab bytes. */
void fl_count_penalty(float *logits, int vocab, const int32_t *out, int n_out, float presence, float frequency,
                      uint8_t *scratch);
/* transformers' NoRepeatNGramLogitsProcessor (in place): the tokens that would complete an n-gram that toks[0:len]
 * already holds (the same n - 1 tokens before it as its last n - 1) get -inf. */
void fl_no_repeat_ngram(float *logits, const int32_t *toks, int len, int n);
/* Choose a token from logits[vocab] (modified in place). idx: scratch of vocab ints. scores (NULL: not wanted):
 * [vocab] the scores the token was drawn from, as transformers' output_scores has them: the logits as given
 * (greedy), or after temperature with -inf for every token that top-k / top-p left out (sampling).
 * Returns -1 only when memory for sorting cannot be had. */
int32_t fl_sample(float *logits, int vocab, const fl_gen_params *p, fl_rng *rng, int32_t *idx, float *scores);
/* out[0] = log softmax(logits)[tok] (the row's max, then the sum of exp(x - max) in double); with 0 < k <= vocab the k
 * most likely tokens, most likely first (ties: the lower id), ids into out[1 .. k] as int32 bits and their
 * log-probabilities into out[1 + k .. 2k]. idx: scratch of vocab ints. Returns -1 when memory for sorting cannot
 * be had. */
int fl_token_logprobs(const float *logits, int vocab, int32_t tok, int k, int32_t *idx, float *out);
int32_t fl_argmax(const float *logits, int vocab);
/* out[i] = log softmax(logits row rows[i])[targets[i]] in float64 arithmetic (the row's max, then the sum of
 * exp(x - max) in double): a loss or perplexity from float32 logits [*, vocab] without a float64 copy of them. Rows
 * and targets must be in range (the caller checks). Rows in parallel on up to `threads`. */
void fl_target_logprobs(const float *logits, int vocab, const int64_t *rows, const int64_t *targets, int64_t n,
                        double *out, int threads);
#endif
