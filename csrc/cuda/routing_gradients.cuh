// The gradient kernels of the fused dynamic routing: dL/dW, dL/du, dL/dbias and dL/dprior
// from what the backward sweep (routing_backward.cuh) stored, the per-sample term vectors
// [B, terms, J, D] and the per-(b, i, j) coefficients [slots, I, J, B'] (BackwardTerms):
//   dL/du_hat[b, i, j] = sum_t coefficient_t[b, i, j] vector_t[b, j]
//   dL/dW[i, j] = sum_b dL/du_hat[b, i, j] (outer) u[b, i]      dL/du[b, i] = sum_j W[i, j]^T dL/du_hat[b, i, j]
//   dL/dbias = sum_b sum_k gs_k[b]                              dL/dprior = sum_b G_0[b]
// CapsNet tile: one kernel forms each dL/du_hat once and uses it for both dW and du.
// Generic tile: grad_weight_kernel and grad_input_kernel, each forming it.
#pragma once

#include "routing_backward.cuh"

namespace capsnet::cuda {

// The coefficients of kSamples consecutive samples, from `first` (that of the first): one
// 16-byte load when they make a whole vector, which then starts at a vector boundary (the
// gradient kernel's rounds: B' and the groups' samples are whole vectors, and so are the
// slots' strides); else a load per sample, the samples past `present` reading the first's.
template <int kSamples, typename acc_t>
__device__ __forceinline__ void load_coefficients(const acc_t* __restrict__ first, int present, acc_t (&c)[kSamples]) {
  if constexpr (kSamples == Vector16<acc_t>::kWidth) {
    // Past `present`: samples past the batch, whose B' padding is in bounds (and not used).
    const Vector16<acc_t> values = load_vector16(first);
#pragma unroll
    for (int q = 0; q < kSamples; ++q) {
      c[q] = values.values[q];
    }
  } else {
#pragma unroll
    for (int q = 0; q < kSamples; ++q) {
      c[q] = first[q < present ? q : 0];
    }
  }
}

// kTerms consecutive product terms of kSamples samples: their coefficients and rows.
template <int kTerms, int kSamples, int kRows, typename acc_t>
struct ProductTerms {
  acc_t coefficients[kTerms][kSamples];
  acc_t values[kTerms][kSamples][kRows];
};

// Loads the terms whose vectors start at offset `vector` (those of them that exist) and
// whose coefficients start at `coefficients`; `sample_vectors` as in grad_predictions.
template <bool kExact, int kTerms, int kSamples, int kRows, typename acc_t>
__device__ __forceinline__ void load_terms(
    const GradientStrides& walk, const acc_t* __restrict__ coefficients, const acc_t* const (&sample_vectors)[kSamples],
    int vector, int rows, int present, ProductTerms<kTerms, kSamples, kRows, acc_t>& terms) {
#pragma unroll
  for (int t = 0; t < kTerms; ++t) {
    if (t == 0 || vector + t * walk.term < walk.sample_terms) {
      load_coefficients(coefficients + t * walk.coefficient_slot, present, terms.coefficients[t]);
#pragma unroll
      for (int q = 0; q < kSamples; ++q) {
        load_vector<kExact>(sample_vectors[q] + vector + t * walk.term, rows, terms.values[t][q]);
      }
    }
  }
}

// x += the products of the terms at `vector` that exist, in term order.
template <int kTerms, int kSamples, int kRows, typename acc_t>
__device__ __forceinline__ void add_terms(
    const GradientStrides& walk, int vector, const ProductTerms<kTerms, kSamples, kRows, acc_t>& terms,
    acc_t (&x)[kSamples][kRows]) {
#pragma unroll
  for (int t = 0; t < kTerms; ++t) {
    if (t == 0 || vector + t * walk.term < walk.sample_terms) {
#pragma unroll
      for (int q = 0; q < kSamples; ++q) {
#pragma unroll
        for (int d = 0; d < kRows; ++d) {
          x[q][d] = fused_multiply_add(terms.coefficients[t][q], terms.values[t][q][d], x[q][d]);
        }
      }
    }
  }
}

// x[q][d] = dL/du_hat[b + q, i, j, row + d], d < kRows, for kSamples consecutive samples of
// which the first `present` exist: the sum of the product terms (BackwardTerms), term by
// term in order. `coefficients` points at (slot 0, i, j, b), `vectors` at (b, term 0, j,
// row); `initial` is c_0[i, j], term 0's coefficient unless it is stored. The samples past
// `present` read sample b's rows (their x is not used). Each x[q] is the same sum, in the
// same order, whatever kSamples and kTermsAtOnce.
//
// What sets this function's time on a GPU is how many times it waits for its loads: each
// group of loads issued before the products that need them is a round trip to L2 or
// memory, which the gradient kernel's few resident warps cannot hide. So the samples go
// term by term together, and with kTermsAtOnce = 2 the later terms come two at a time, the
// first two with term 0 (the count, 2r - 1 or 1, is odd): at r = 3 two waits instead of
// five. That holds two terms' loads in registers, which only the 4-row float-math gradient
// kernel has room for; the others (float64, 8 rows, the generic tile) would spill.
template <bool kExact, int kTermsAtOnce, int kSamples, int kRows, typename acc_t>
__device__ __forceinline__ void grad_predictions(
    const GradientStrides& walk, const acc_t* __restrict__ coefficients, acc_t initial,
    const acc_t* __restrict__ vectors, int rows, int present, acc_t (&x)[kSamples][kRows]) {
  static_assert(kTermsAtOnce == 1 || kTermsAtOnce == 2, "terms one or two at a time");
  const acc_t* sample_vectors[kSamples];  // the rows each slot reads: its sample's, or b's
  const acc_t* sample_coefficients[kSamples];
#pragma unroll
  for (int q = 0; q < kSamples; ++q) {
    const int sample = q < present ? q : 0;
    sample_vectors[q] = vectors + sample * walk.sample_terms;
    sample_coefficients[q] = coefficients + sample;
  }
  // Term 0's coefficient a sample at a time, even where load_coefficients could load a
  // vector: with it there, ptxas spills 16 bytes in the float64 kernel (make cuda-model),
  // for 3 loads per round saved in the float one.
  acc_t values[kSamples][kRows];
  acc_t scales[kSamples];
#pragma unroll
  for (int q = 0; q < kSamples; ++q) {
    load_vector<kExact>(sample_vectors[q], rows, values[q]);
    scales[q] = walk.first_stored ? sample_coefficients[q][0] : initial;
  }
  // Terms 1 .. count - 1 (full form only): coefficient slots 0 .. count - 2. The vector's
  // offset counts the terms (a sample's term vectors end at sample_terms).
  ProductTerms<kTermsAtOnce, kSamples, kRows, acc_t> terms;
  if constexpr (kTermsAtOnce == 2) {
    if (walk.term < walk.sample_terms) {
      load_terms<kExact>(walk, coefficients, sample_vectors, walk.term, rows, present, terms);
    }
  }
#pragma unroll
  for (int q = 0; q < kSamples; ++q) {
#pragma unroll
    for (int d = 0; d < kRows; ++d) {
      x[q][d] = scales[q] * values[q][d];
    }
  }
  int coefficient = 0;  // the offset of the next terms' first coefficient slot
  if constexpr (kTermsAtOnce == 1) {
#pragma unroll 1
    for (int vector = walk.term; vector < walk.sample_terms; vector += walk.term) {  // model-loop: terms - 1
      load_terms<kExact>(walk, coefficients + coefficient, sample_vectors, vector, rows, present, terms);
      add_terms(walk, vector, terms, x);
      coefficient += walk.coefficient_slot;
    }
  } else {
    // Each pair's products, then the next pair's loads (loaded before a pair's products,
    // they would need a second pair's registers).
#pragma unroll 1
    for (int vector = walk.term; vector < walk.sample_terms; vector += 2 * walk.term) {  // model-loop: (terms - 1) // 2
      add_terms(walk, vector, terms, x);
      coefficient += 2 * walk.coefficient_slot;
      if (vector + 2 * walk.term < walk.sample_terms) {
        // model-fraction-begin: 1 - 1 / max(1, (terms - 1) // 2)
        load_terms<kExact>(walk, coefficients + coefficient, sample_vectors, vector + 2 * walk.term, rows, present, terms);
        // model-fraction-end
      }
    }
  }
}

// grad_predictions of one sample: x[d] = dL/du_hat[b, i, j, row + d].
template <bool kExact, int kRows, typename acc_t>
__device__ __forceinline__ void grad_prediction(
    const GradientStrides& walk, const acc_t* __restrict__ coefficients, acc_t initial,
    const acc_t* __restrict__ vectors, int rows, acc_t (&x)[kRows]) {
  acc_t one[1][kRows];
  grad_predictions<kExact, 1, 1>(walk, coefficients, initial, vectors, rows, 1, one);
#pragma unroll
  for (int d = 0; d < kRows; ++d) {
    x[d] = one[0][d];
  }
}

// A gradient that is either written (scalar_t output) or, when the batch is processed in
// slices, added to an op-math sum (the first slice starts it).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void put_gradient(scalar_t* out, acc_t* sum, bool first_slice, int64_t index, acc_t value) {
  // The host passes sums exactly when it runs the backward in slices of the batch.
  if (sum != nullptr) {
    // model-fraction-begin: 1 if backward_slice_batch < batch else 0
    sum[index] = first_slice ? value : sum[index] + value;
    // model-fraction-end
  } else {
    // model-fraction-begin: 0 if backward_slice_batch < batch else 1
    out[index] = static_cast<scalar_t>(value);
    // model-fraction-end
  }
}

// put_gradient for a row of kCount values at `index`: into the output, a whole number of
// 16-byte vectors (dW rows; routing_host.h allocates it aligned), or added to the sums.
template <int kCount, typename scalar_t, typename acc_t>
__device__ __forceinline__ void put_gradient_row(
    scalar_t* out, acc_t* sum, bool first_slice, int64_t index, const acc_t (&values)[kCount]) {
  if (sum == nullptr) {
    // model-fraction-begin: 0 if backward_slice_batch < batch else 1
    scalar_t row[kCount];
#pragma unroll
    for (int k = 0; k < kCount; ++k) {
      row[k] = static_cast<scalar_t>(values[k]);
    }
    store_vector<true>(row, kCount, out + index);
    // model-fraction-end
  } else {
#pragma unroll
    for (int k = 0; k < kCount; ++k) {
      put_gradient(out, sum, first_slice, index + k, values[k]);
    }
  }
}

// dL/dbias[column] = sum_b sum over the gs terms of gs_k[b, column] (the bias enters every
// s_k; with detach_routing only s_{r-1}), column = (j, d), for the columns block, block +
// blocks, ...: thread t sums the terms of samples t, t + threads, ...; the block adds the
// threads' sums in a fixed order (16 strided partial sums, then those). Every thread of the
// block calls it; `shared` holds threads + 16 values.
template <typename scalar_t, typename acc_t>
__device__ void bias_gradient(const BackwardParams<scalar_t>& p, int block, int blocks, int thread, int threads, acc_t* shared) {
  const RoutingGeometry& g = p.geometry;
  const int columns = int(g.columns());
  const int batch = int(g.shape.batch);
  const int count = p.terms_of.grad_s_count();  // terms 0 .. count - 1 are the gs_k
  const int sample_stride = int(g.part.terms * g.columns());
  const int term_stride = columns;
  constexpr int kFirstLevel = 16;
#pragma unroll 1
  for (int column = block; column < columns; column += blocks) {  // model-loop: ceil(num_out * dim_out / gradient_blocks)
    acc_t total = 0;
    const acc_t* sample = p.terms + thread * sample_stride + column;
#pragma unroll 1
    for (int b = thread; b < batch; b += threads) {  // model-loop: ceil(batch / gradient_threads)
      const acc_t* term = sample;
#pragma unroll 1
      for (int k = 0; k < count; ++k) {  // model-loop: grad_s_terms
        total += *term;
        term += term_stride;
      }
      sample += threads * sample_stride;
    }
    shared[thread] = total;
    __syncthreads();
    if (thread < kFirstLevel) {
      acc_t part = 0;
#pragma unroll 1
      for (int k = thread; k < threads; k += kFirstLevel) {  // model-loop: ceil(gradient_threads / 16)
        part += shared[k];
      }
      shared[threads + thread] = part;
    }
    __syncthreads();
    if (thread == 0) {
      acc_t sum = 0;
#pragma unroll
      for (int k = 0; k < kFirstLevel; ++k) {
        sum += shared[threads + k];
      }
      put_gradient(p.grad_bias, p.grad_bias_sum, p.first_slice, column, sum);
    }
    __syncthreads();  // shared is read before the next column overwrites it
  }
}

// ---------------------------------------------------------------------------------------
// CapsNet tile: dW and du from one dL/du_hat.
// ---------------------------------------------------------------------------------------

// gradient_kernel's __launch_bounds__ for kRows rows of W[i, j] per thread (routing_layout.h).
template <int kRows>
constexpr int kGradientMaxThreads = gradient_max_threads(kRows);
template <int kRows>
constexpr int kGradientMinBlocks = gradient_min_blocks(kRows);

// Grid ceil(I / inputs_per_block); block (row groups x inputs_per_block, J, sample groups),
// inputs_per_block x groups = kGradientInputGroups. Thread (row group, input, j, group) owns
// rows [kRows * row group, + kRows) (kDefaultGradientRows, or the plan's) of W[i, j] (in
// registers, loaded once) and of dW[i, j] (accumulated), and walks its group's samples in
// rounds of a 16-byte vector of samples: per sample, x = dL/du_hat[b, i, j, rows]
// (grad_predictions), dW rows += x (outer) u[b, i], and the partial W[i, j, rows]^T x of
// dL/du[b, i], which meets the other J x row-group partials in shared memory ([round
// sample][group x input][e][J x row groups, padded to kMaxNumOut x row groups with zeros]);
// after each round, the block's threads add them up (in the order j, row group) and store
// dL/du. At the end the groups' dW rows are added in a fixed pairwise tree, and the block
// does its share of dL/dbias. With 4 rows (kNarrowGradientRows) and float math, a round's
// samples form their dL/du_hat rows together, and with kLoadsAhead load their terms two at
// a time (grad_predictions) and the next round's u rows into shared memory. dL/du_hat, and so dW,
// dbias and dprior, have the same bits whatever kRows; dL/du adds J x row groups partials,
// so its rounding depends on kRows.
template <typename scalar_t, typename Tile, int kRows = kDefaultGradientRows,
    bool kLoadsAhead = gradient_round_in_flight(kRows, int(sizeof(opmath_t<scalar_t>)))>
__global__ void __launch_bounds__(kGradientMaxThreads<kRows>, kGradientMinBlocks<kRows>)
    gradient_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kDimIn = Tile::kMaxDimIn;
  constexpr int kRowGroups = gradient_row_groups(kRows);
  // J x row groups partials per dL/du value, padded to whole 16-byte vectors.
  constexpr int kContributors = (kRowGroups * Tile::kMaxNumOut + Vector16<acc_t>::kWidth - 1) / Vector16<acc_t>::kWidth *
      Vector16<acc_t>::kWidth;
  constexpr int kRound = Vector16<acc_t>::kWidth;  // samples per round
  // Where the registers allow it, the samples whose dL/du_hat rows are formed together
  // (their loads in flight at once); with kLoadsAhead (the planner's there,
  // RoutingPlan::gradient_loads_ahead), also the product terms two at a time
  // (grad_predictions) and the u rows staged a round ahead (below).
  constexpr bool kRoundInFlight = gradient_round_in_flight(kRows, int(sizeof(acc_t)));
  static_assert(kRoundInFlight || !kLoadsAhead, "loading ahead needs the registers of a round in flight");
  constexpr int kInFlight = kRoundInFlight ? kRound : 1;
  constexpr int kTermsAtOnce = kLoadsAhead ? 2 : 1;
  constexpr int kSlots = kGradientInputGroups;  // (group, input) pairs per block
  static_assert(Tile::kExactDimIn && Tile::kExactDimOut && kDimIn == 8 && kSlots == 8, "the CapsNet tile");
  static_assert(kContributors % Vector16<acc_t>::kWidth == 0, "contributor rows are whole vectors");
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const int row_group = threadIdx.x % kRowGroups;
  const int input_in_block = threadIdx.x / kRowGroups;
  const int inputs_per_block = g.part.gradient_inputs_per_block;
  const int j = threadIdx.y;
  const int group = threadIdx.z;
  const int groups = blockDim.z;
  const int i = int(blockIdx.x) * inputs_per_block + input_in_block;
  const bool active = i < n.num_in;
  const int read_i = active ? i : int(n.num_in) - 1;
  const int row = row_group * kRows;
  const int threads = int(blockDim.x * blockDim.y * blockDim.z);
  const int flat = int((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x);
  const int slot = group * inputs_per_block + input_in_block;  // (group, input) in [0, kSlots)
  const int contributor = j * kRowGroups + row_group;
  const int num_out = int(n.num_out);
  const int num_in = int(n.num_in);
  const int batch = int(n.batch);
  acc_t* shared = dynamic_shared_memory<acc_t>();

  // The contributor entries past J x row groups stay zero. Row r of a round (a dL/du value)
  // goes to the same place in every round, shifted by the round's samples: its destination
  // (GradientRowDestination) is worked out once, after the round's rows in shared memory.
  constexpr int kRoundRows = kRound * kSlots * kDimIn;  // dL/du values per round
  GradientRowDestination* const destinations =
      reinterpret_cast<GradientRowDestination*>(shared + kRoundRows * kContributors);
  const int group_samples = int(g.part.gradient_group_samples);
  const int sample_values = num_in * kDimIn;  // dL/du values per sample
#pragma unroll 1
  for (int r = flat; r < kRoundRows; r += threads) {  // model-loop: ceil(gradient_round_rows / gradient_threads)
#pragma unroll
    for (int k = 0; k < kContributors; ++k) {
      if (k >= num_out * kRowGroups) {
        shared[r * kContributors + k] = acc_t(0);
      }
    }
    // r = (round sample * kSlots + slot) * kDimIn + e: unsigned, so that the divisions by
    // these powers of two are shifts.
    const unsigned row_index = unsigned(r);
    const int e = int(row_index % kDimIn);
    const int their_slot = int(row_index / kDimIn % kSlots);
    const int their_group = their_slot >> g.part.gradient_input_shift;
    const int their_i = int(blockIdx.x) * inputs_per_block + (their_slot & (inputs_per_block - 1));
    const int round_sample = int(row_index / (kDimIn * kSlots));
    const int group_first = their_group * group_samples;
    // Stored in the rounds whose first sample (counted in the group) is below `limit`:
    // the sample must be in the group and in the batch, and the input must exist.
    const int in_group = smaller(group_samples, batch - group_first) - round_sample;
    destinations[r].limit = their_i < num_in ? in_group : 0;
    destinations[r].offset = their_i < num_in && in_group > 0
        ? (group_first + round_sample) * sample_values + their_i * kDimIn + e  // 32 bits: u has < 2^31 elements
        : 0;
  }

  // With kLoadsAhead, the u rows of a round go through shared memory, copied a round
  // ahead ([2][kRoundRows], after the destinations): value r of a round is u[b, i, e] for
  // the (b, i, e) of row r's dL/du, so its destination says where it is and whether it
  // exists. The next round's copies land while this round waits on its terms, instead of
  // the u rows' own round trips after them. 16-byte pieces of kPiece values, within a row
  // of E. Without, each u row is loaded where it is used.
  constexpr int kPiece = 16 / int(sizeof(scalar_t));
  constexpr int kRoundPieces = kRoundRows / kPiece;
  static_assert(kDimIn % kPiece == 0 && kRoundRows % kPiece == 0, "a piece lies within one row of u");
  scalar_t* const u_stages = reinterpret_cast<scalar_t*>(destinations + kRoundRows);
  const auto stage_round = [&](int stage, int round_first) {  // round_first: counted in the group
    scalar_t* const staged = u_stages + stage * kRoundRows;
#pragma unroll 1
    for (int piece = flat; piece < kRoundPieces; piece += threads) {  // model-loop: ceil(gradient_round_rows * storage_bytes / 16 / gradient_threads)
      const GradientRowDestination destination = destinations[piece * kPiece];
      if (round_first < destination.limit) {
        copy16_async(staged + piece * kPiece, p.u + (destination.offset + round_first * sample_values));
      }
    }
    commit_copies();
  };
  if constexpr (kLoadsAhead) {
    __syncthreads();  // the destinations are written
    stage_round(0, 0);
  }

  acc_t w[kRows][kDimIn];
#pragma unroll
  for (int d = 0; d < kRows; ++d) {
    load_row<Tile>(p.W + g.weight_matrix(read_i, j) + (row + d) * kDimIn, kDimIn, w[d]);
  }
  acc_t grad_w[kRows][kDimIn];
  fill(grad_w, acc_t(0));
  acc_t grad_prior = 0;
  const bool sums_prior = p.grad_prior != nullptr && row_group == 0;

  // This group's samples [first, end) (none for a thread past the last input), walked with
  // 32-bit offsets: u[b, i], the term vectors (b, term 0, j, rows), the coefficients
  // (slot 0, i, j, b); the strides are kernel parameters (p.strides).
  const GradientStrides& walk = p.strides;
  const int first = group * group_samples;
  const int end = active ? smaller(first + group_samples, batch) : first;
  int coefficient = int(g.coefficient(0, read_i, j, first));
  int vector = int(g.term_vector(first, 0, j)) + row;
  int u_row = int(g.input_row(first, read_i));  // without kLoadsAhead
  const acc_t initial = initial_coupling(p.prior_couplings, g, read_i, j, p.options);
  acc_t* const mine = shared + (slot * kDimIn) * kContributors + contributor;  // round sample 0, e = 0
  if constexpr (kLoadsAhead) {
    wait_for_copies<0>();
    __syncthreads();  // the first round's u rows have landed
  }
#pragma unroll 1
  for (int b = first; b < first + group_samples; b += kRound) {  // model-loop: gradient_rounds
    const int round_samples = end - b;
    const int round_first = b - first;  // the round's first sample, counted in the group
    const int stage = (round_first / kRound) & 1;
    if constexpr (kLoadsAhead) {
      if (round_first + kRound < group_samples) {
        // model-fraction-begin: 1 - 1 / gradient_rounds
        stage_round(stage ^ 1, round_first + kRound);  // into the stage the round before read
        // model-fraction-end
      }
    }
    const scalar_t* const staged_u = u_stages + stage * kRoundRows + slot * kDimIn;  // round sample 0
    // The round's samples kInFlight at a time: their dL/du_hat rows x, then per sample
    // dW rows += x (outer) u[b, i] and its partial of dL/du[b, i].
#pragma unroll
    for (int first_q = 0; first_q < kRound; first_q += kInFlight) {
      if (first_q >= round_samples) {
        continue;
      }
      acc_t xs[kInFlight][kRows];
      grad_predictions<true, kTermsAtOnce>(walk, p.coefficients + (coefficient + first_q), initial,
          p.terms + (vector + first_q * walk.sample_terms), kRows, round_samples - first_q, xs);
#pragma unroll
      for (int in_flight = 0; in_flight < kInFlight; ++in_flight) {
        const int q = first_q + in_flight;
        if (q >= round_samples) {
          continue;
        }
        const acc_t (&x)[kRows] = xs[in_flight];
        acc_t u_i[kDimIn];
        if constexpr (kLoadsAhead) {
          load_row<Tile>(staged_u + q * (kSlots * kDimIn), kDimIn, u_i);
        } else {
          load_row<Tile>(p.u + (u_row + q * walk.sample_input), kDimIn, u_i);
        }
        acc_t partial[kDimIn];
        fill(partial, acc_t(0));
#pragma unroll
        for (int d = 0; d < kRows; ++d) {
#pragma unroll
          for (int e = 0; e < kDimIn; ++e) {
            grad_w[d][e] = fused_multiply_add(x[d], u_i[e], grad_w[d][e]);
            partial[e] = fused_multiply_add(w[d][e], x[d], partial[e]);
          }
        }
#pragma unroll
        for (int e = 0; e < kDimIn; ++e) {
          mine[(q * kSlots * kDimIn + e) * kContributors] = partial[e];
        }
      }
    }
    coefficient += kRound;
    vector += kRound * walk.sample_terms;
    u_row += kRound * walk.sample_input;
    __syncthreads();
    // dL/du[b, i, e] = the sum of a row of contributors, in the order (j, row group).
    const int round_values = round_first * sample_values;
#pragma unroll 1
    for (int r = flat; r < kRoundRows; r += threads) {  // model-loop: ceil(gradient_round_rows / gradient_threads)
      const acc_t* entries = shared + r * kContributors;
      acc_t total = 0;
#pragma unroll
      for (int k = 0; k < kContributors; k += Vector16<acc_t>::kWidth) {
        const Vector16<acc_t> chunk = load_vector16(entries + k);
#pragma unroll
        for (int v = 0; v < Vector16<acc_t>::kWidth; ++v) {
          total += chunk.values[v];
        }
      }
      const GradientRowDestination destination = destinations[r];
      if (round_first < destination.limit) {
        p.grad_u[destination.offset + round_values] = static_cast<scalar_t>(total);
      }
    }
    if constexpr (kLoadsAhead) {
      wait_for_copies<0>();  // the next round's u rows: landed before the barrier publishes them
    }
    __syncthreads();  // the round's entries are read before the next round overwrites them
  }

  if (sums_prior) {
    // model-fraction-begin: has_prior
    // The group's G_0 coefficients, a 16-byte vector of samples at a time (B' and the
    // rounds are whole vectors of samples), added in sample order; entries past the batch
    // are not. (A loop of its own: inside the rounds, the compiler would predicate it, and
    // calls without a prior would issue it.)
    const acc_t* prior = p.coefficients + (g.coefficient(0, read_i, j, first) + walk.prior_slot);
#pragma unroll 1
    for (int b = first; b < end; b += kRound) {  // model-loop: gradient_rounds
      const Vector16<acc_t> values = load_vector16(prior);
#pragma unroll
      for (int q = 0; q < kRound; ++q) {
        if (q < end - b) {
          grad_prior += values.values[q];
        }
      }
      prior += kRound;
    }
    // model-fraction-end
  }

  // dW rows and the prior's sum: the groups' sums added pairwise, group g + step into
  // group g, each thread's whole share at once (gradient_group_share).
  // The groups are blockDim.z, a power of two (2^gradient_group_levels).
  constexpr int kShare = gradient_group_share(int(sizeof(acc_t)), kRows);
  const int per_group = int(blockDim.x * blockDim.y);
  const int in_group = int(threadIdx.y * blockDim.x + threadIdx.x);
#pragma unroll 1
  for (int level = 0; level < g.part.gradient_group_levels; ++level) {  // model-loop: gradient_group_levels
    const int step = 1 << level;
    const int place = group & (2 * step - 1);  // 0: a receiver, step: its sender
    acc_t* const share = shared + ((group >> (level + 1)) * per_group + in_group) * kShare;
    if (place == step) {  // the sender
#pragma unroll
      for (int d = 0; d < kRows; ++d) {
        store_vector<true>(grad_w[d], kDimIn, share + d * kDimIn);
      }
      Vector16<acc_t> prior{};
      prior.values[0] = grad_prior;
      store_vector16(prior, share + kRows * kDimIn);
    }
    __syncthreads();
    if (place == 0 && group + step < groups) {  // its receiver
#pragma unroll
      for (int d = 0; d < kRows; ++d) {
        acc_t theirs[kDimIn];
        load_vector<true>(share + d * kDimIn, kDimIn, theirs);
#pragma unroll
        for (int e = 0; e < kDimIn; ++e) {
          grad_w[d][e] += theirs[e];
        }
      }
      grad_prior += share[kRows * kDimIn];
    }
    __syncthreads();  // read before the next level overwrites
  }
  if (group == 0 && active) {
#pragma unroll
    for (int d = 0; d < kRows; ++d) {
      put_gradient_row(p.grad_W, p.grad_W_sum, p.first_slice, g.weight_matrix(i, j) + (row + d) * kDimIn, grad_w[d]);
    }
    if (sums_prior) {
      put_gradient(p.grad_prior, p.grad_prior_sum, p.first_slice, g.pair(i, j), grad_prior);
    }
  }
  bias_gradient(p, int(blockIdx.x), int(gridDim.x), flat, threads, shared);
}

// ---------------------------------------------------------------------------------------
// Generic tile.
// ---------------------------------------------------------------------------------------

// dL/dW[i, j, d, :] = sum_b dL/du_hat[b, i, j, d] u[b, i, :]  (Eq. 2), and grad_prior[i, j] =
// sum_b G_0[b, i, j]. Grid (ceil(I / 32), J, row-group blocks), block (32 inputs, row
// groups, sample groups): thread (lane, y, z) owns input i = 32 blockIdx.x + lane, rows
// [kRows * group, + kRows) of dW[i, j] and samples b = z, z + Z, ...; the sample groups'
// sums meet in shared memory and are added in group order (no atomics: fixed order).
// Also the block's share of dL/dbias.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(kGradWeightMaxThreads) grad_weight_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kRows = Tile::kGradRows;
  constexpr int kDimIn = Tile::kMaxDimIn;
  constexpr bool kExact = Tile::kExactDimOut;
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const int64_t i = int64_t(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t j = blockIdx.y;
  const int64_t row = (int64_t(blockIdx.z) * blockDim.y + threadIdx.y) * kRows;
  const bool active = i < n.num_in && row < n.dim_out;
  const int group = threadIdx.z;
  const int groups = blockDim.z;
  const bool sums_prior = p.grad_prior != nullptr && row == 0;
  const int rows = int(smaller(int64_t(kRows), n.dim_out - row));

  acc_t grad_w[kRows][kDimIn];
  fill(grad_w, acc_t(0));
  acc_t grad_prior = 0;
  if (active && group < n.batch) {
    // 32-bit offsets walked over this group's samples.
    const GradientStrides& walk = p.strides;
    int coefficient = int(g.coefficient(0, i, j, group));
    int vector = int(g.term_vector(group, 0, j) + row);
    int u_row = int(g.input_row(group, i));
    const int vectors_step = groups * walk.sample_terms;
    const int u_step = groups * walk.sample_input;
    const acc_t initial = initial_coupling(p.prior_couplings, g, i, j, p.options);
    for (int64_t b = group; b < n.batch; b += groups) {  // model-loop: ceil(batch / sample_groups)
      acc_t x[kRows];
      grad_prediction<kExact>(walk, p.coefficients + coefficient, initial, p.terms + vector, rows, x);
      acc_t u_i[kDimIn];
      load_row<Tile>(p.u + u_row, n.dim_in, u_i);
#pragma unroll
      for (int d = 0; d < kRows; ++d) {
#pragma unroll
        for (int e = 0; e < kDimIn; ++e) {
          grad_w[d][e] = fused_multiply_add(x[d], u_i[e], grad_w[d][e]);
        }
      }
      if (sums_prior) {
        grad_prior += p.coefficients[coefficient + walk.prior_slot];
      }
      coefficient += groups;
      vector += vectors_step;
      u_row += u_step;
    }
  }

  // Sum over the sample groups, one row of kDimIn values per round: group z writes its
  // row, group 0 adds them in order z = 0..Z-1.
  acc_t* shared = dynamic_shared_memory<acc_t>();
  const int xy = threadIdx.y * blockDim.x + threadIdx.x;
  const int xy_threads = blockDim.x * blockDim.y;
#pragma unroll
  for (int d = 0; d <= kRows; ++d) {  // the last round carries grad_prior
    if (groups > 1) {
      acc_t* mine = shared + (int64_t(group) * xy_threads + xy) * kDimIn;
      if (d < kRows) {
#pragma unroll
        for (int e = 0; e < kDimIn; ++e) {
          mine[e] = grad_w[d][e];
        }
      } else {
        mine[0] = grad_prior;
      }
      __syncthreads();
      if (group == 0) {
#pragma unroll 1
        for (int other = 1; other < groups; ++other) {  // model-loop: sample_groups - 1
          const acc_t* theirs = shared + (int64_t(other) * xy_threads + xy) * kDimIn;
          if (d < kRows) {
#pragma unroll
            for (int e = 0; e < kDimIn; ++e) {
              grad_w[d][e] += theirs[e];
            }
          } else {
            grad_prior += theirs[0];
          }
        }
      }
      __syncthreads();  // read before the next round overwrites
    }
    if (group == 0 && active) {
      if (d < kRows) {
        if (d < rows) {
          const int64_t out = g.weight_matrix(i, j) + (row + d) * n.dim_in;
#pragma unroll
          for (int e = 0; e < kDimIn; ++e) {
            if (Tile::kExactDimIn || e < n.dim_in) {
              put_gradient(p.grad_W, p.grad_W_sum, p.first_slice, out + e, grad_w[d][e]);
            }
          }
        }
      } else if (sums_prior) {
        put_gradient(p.grad_prior, p.grad_prior_sum, p.first_slice, g.pair(i, j), grad_prior);
      }
    }
  }
  const int block = int((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x);
  bias_gradient(p, block, int(gridDim.x * gridDim.y * gridDim.z), int((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x),
      int(blockDim.x * blockDim.y * blockDim.z), shared);
}

// dL/du[b, i] = sum_j W[i, j]^T dL/du_hat[b, i, j]  (Eq. 2). Grid and block as the routing
// kernels: thread (lane, j) computes W[i, j]^T dL/du_hat[j|i] for its sample; the sum over j
// meets in shared memory ([slice][J][lanes]), p.geometry.part.grad_input_slice input
// dimensions per round, and is added in the order j = 0..J-1.
template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(Tile::kMaxThreads, Tile::kMinBlocks) grad_input_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  constexpr bool kExact = Tile::kExactDimOut;
  static_assert(samples_per_thread<Tile>(int(sizeof(acc_t))) == 1, "one sample per thread");
  const RoutingGeometry& g = p.geometry;
  const RoutingShape& n = g.shape;
  const RoutingThread<Tile, 1> t = RoutingThread<Tile, 1>::locate(g);
  const int lanes = g.part.lanes;
  const int slice = g.part.grad_input_slice;
  const int dim_out = int(n.dim_out), dim_in = int(n.dim_in), num_out = int(n.num_out);
  acc_t* per_capsule = dynamic_shared_memory<acc_t>();

  // Pointers walked along the chunk; lanes past the batch read sample B-1 and store nothing.
  const int b = t.read_b[0];
  const int coefficient_step = int(n.num_out * g.part.coefficient_batch);
  int coefficient = int(g.coefficient(0, t.i_begin, t.j, b));
  const int vector = int(g.term_vector(b, 0, t.j));
  const scalar_t* W_ij = p.W + g.weight_matrix(t.i_begin, t.j);
  const int64_t W_step = n.num_out * n.dim_out * n.dim_in;
  const int row_stride = Tile::kExactDimIn ? Tile::kMaxDimIn : dim_in;
  scalar_t* grad_u = p.grad_u + g.input_row(b, t.i_begin);

  const acc_t uniform = uniform_coupling<acc_t>(n.num_out, p.options);
  const acc_t* initial = p.prior_couplings != nullptr ? p.prior_couplings + g.pair(t.i_begin, t.j) : nullptr;
  for (int step = 0; step < t.inputs; ++step) {  // model-loop: inputs_per_chunk
    acc_t x[Tile::kMaxDimOut];
    grad_prediction<kExact>(
        p.strides, p.coefficients + coefficient, initial != nullptr ? *initial : uniform, p.terms + vector, dim_out, x);
    initial = initial != nullptr ? initial + n.num_out : nullptr;
    // This capsule's term of dL/du[b, i]: W[i, j]^T dL/du_hat[j|i].
    acc_t term[Tile::kMaxDimIn];
    fill(term, acc_t(0));
#pragma unroll
    for (int d = 0; d < Tile::kMaxDimOut; ++d) {
      if (kExact || d < dim_out) {
        acc_t w[Tile::kMaxDimIn];
        load_row<Tile>(W_ij + d * row_stride, dim_in, w);
#pragma unroll
        for (int e = 0; e < Tile::kMaxDimIn; ++e) {
          term[e] = fused_multiply_add(w[e], x[d], term[e]);
        }
      }
    }
    coefficient += coefficient_step;
    W_ij += W_step;
    for (int first = 0; first < dim_in; first += slice) {  // model-loop: input_slices
      const int width = smaller(slice, dim_in - first);
#pragma unroll
      for (int e = 0; e < Tile::kMaxDimIn; ++e) {
        if (e >= first && e < first + width) {
          per_capsule[((e - first) * num_out + t.j) * lanes + t.lane] = term[e];
        }
      }
      __syncthreads();
#pragma unroll 1
      for (int e = t.j; e < width; e += num_out) {  // model-loop: min(grad_input_slice, num_out) / num_out
        acc_t total = 0;
#pragma unroll 1
        for (int k = 0; k < num_out; ++k) {  // model-loop: num_out
          total += per_capsule[(e * num_out + k) * lanes + t.lane];
        }
        if (t.active[0]) {
          grad_u[first + e] = static_cast<scalar_t>(total);
        }
      }
      __syncthreads();  // reads done before the next round overwrites per_capsule
    }
    grad_u += n.dim_in;
  }
}

}  // namespace capsnet::cuda
