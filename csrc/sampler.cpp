// ddk_fast._sampler_ext: the streaming token-domain sampler core in C++ (pybind11 + numpy buffers only).
//
// It reproduces ddk_fast/data/packing.py (NumpySamplerCore) bit for bit; read that module's docstring for
// the semantics. In short, per global sequence:
//   domain  d = argmax_d  w[d] * (n + 1) - count[d]          (largest deficit, first index on ties)
//   tokens    = stream_d[k * L, k * L + L + 1)                (k = the domain's next sequence index)
//   stream_d  = epoch 0, epoch 1, ...; epoch e = documents in ascending splitmix64-key order, each + sep
// Rank r of W materialises rows [r * B, (r + 1) * B) of each global batch of W * B choices.
//
// Memory traffic per batch: B * (L + 1) token reads (2 or 4 bytes, from the memory-mapped shard; only the
// pages touched become resident) and 3 * B * L * 8 bytes of int64 output (input_ids, labels, domain_ids).
// The shards are borrowed numpy buffers (np.frombuffer over mmap): never copied. The GIL is released while
// a batch is assembled so a prefetch thread overlaps with the training step.
//
// Index memory per domain: 12 bytes per document for the current epoch (token start + length in visiting
// order) plus a stream position every 64 documents; building an epoch needs 8 more bytes per document
// for the sort keys. The keys are mix64(epoch_key ^ i), a bijection of i, so they are all distinct (no
// ties) and the document index is recovered by inverting mix64: no (key, index) pairs are sorted.
//
// Resident pages: a domain given a file descriptor (set_read_fds; Python does so for shards larger than
// their share of the page budget) reads its tokens with pread() from the OS page cache instead of through
// the mapping, so streaming it maps nothing: on Linux >= 6.x a fault may map a whole large folio (up to
// 2 MiB) per random document, which made RSS grow by ~1.8 MB per short document read. Its offsets are
// still mapped (read once per epoch) and their pages are dropped after each epoch's index is built.
//
// Loss masks (set_masks): a domain may carry one uint8 per token (chat / prompt-completion data); its labels
// are then ignore_index where the label's stream position has mask 0, and its separators have mask 0. The
// mask is read through its mapping (1 byte per token read) in both read modes.
//
// Floating point: the deficit is one multiply and one subtract in double; built with -ffp-contract=off so
// no FMA changes a rounding and the choice matches numpy exactly.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define DDK_HAVE_POSIX 1
#endif
#include <cerrno>

namespace py = pybind11;

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kM1 = 0xBF58476D1CE4E5B9ULL, kM1Inv = 0x96DE1B173F119089ULL;  // kM1 * kM1Inv == 1
constexpr uint64_t kM2 = 0x94D049BB133111EBULL, kM2Inv = 0x319642B2D24D8EC3ULL;
constexpr int64_t kBlock = 64;            // documents per stream-position checkpoint
constexpr int64_t kPrefetchAhead = 8;     // documents ahead to prefetch (see fill)
constexpr int64_t kMaxPos = int64_t{1} << 62;  // bound on stream positions (seq_index * seq_len)

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  uint64_t z = x + kGamma;
  z = (z ^ (z >> 30)) * kM1;
  z = (z ^ (z >> 27)) * kM2;
  return z ^ (z >> 31);
}

inline uint64_t unxorshift(uint64_t y, int s) {  // inverse of y = x ^ (x >> s)
  uint64_t x = y;
  for (int i = 0; i < 64 / s + 1; ++i) x = y ^ (x >> s);
  return x;
}

inline uint64_t unmix64(uint64_t y) {  // mix64's inverse
  uint64_t z = unxorshift(y, 31) * kM2Inv;
  z = unxorshift(z, 27) * kM1Inv;
  return unxorshift(z, 30) - kGamma;
}

struct Domain {
  py::array tokens_ref;  // keeps the mapped buffers alive
  py::array offsets_ref;
  const char* tokens = nullptr;
  int itemsize = 2;
  int64_t n_tokens = 0;
  const int64_t* offsets = nullptr;
  int64_t n_docs = 0;
  int64_t stream_len = 0;
  // current epoch, in visiting order: token start and length of each document, and the stream position
  // of every kBlock-th document (block_pos[b] = stream start of document b * kBlock; last = stream_len)
  int64_t cached_epoch = -1;
  std::vector<int64_t> start;
  std::vector<uint32_t> length;
  std::vector<int64_t> block_pos;
  int fd = -1;  // >= 0: read tokens with pread(fd) instead of the mapping
  py::object mask_ref;  // keeps the mapped loss mask alive (None: every label counts)
  const uint8_t* mask = nullptr;
};

class SamplerCore {
 public:
  SamplerCore(py::list tokens, py::list offsets, int64_t seq_len, int64_t batch_size, int64_t sep,
              uint64_t seed, int64_t rank, int64_t world_size)
      : seq_len_(seq_len), batch_size_(batch_size), sep_(sep), seed_(seed), rank_(rank),
        world_size_(world_size) {
    if (tokens.size() != offsets.size() || tokens.size() == 0)
      throw std::invalid_argument("tokens and offsets: expected one array per domain, same count");
    if (seq_len < 1 || batch_size < 1 || world_size < 1 || rank < 0 || rank >= world_size)
      throw std::invalid_argument("seq_len, batch_size, world_size >= 1 and 0 <= rank < world_size");
    const size_t nd = tokens.size();
    domains_.resize(nd);
    for (size_t d = 0; d < nd; ++d) {
      Domain& D = domains_[d];
      const std::string name = "[" + std::to_string(d) + "]";
      D.tokens_ref = py::reinterpret_borrow<py::array>(tokens[d]);
      D.offsets_ref = py::reinterpret_borrow<py::array>(offsets[d]);
      py::array& t = D.tokens_ref;
      py::array& o = D.offsets_ref;
      if (t.ndim() != 1 || !(t.flags() & py::array::c_style))
        throw std::invalid_argument("tokens" + name + ": expected a contiguous 1-D array");
      if (t.dtype().is(py::dtype::of<uint16_t>())) {
        D.itemsize = 2;
      } else if (t.dtype().is(py::dtype::of<uint32_t>())) {
        D.itemsize = 4;
      } else {
        throw std::invalid_argument("tokens" + name + ": expected uint16 or uint32");
      }
      if (o.ndim() != 1 || !(o.flags() & py::array::c_style) || !o.dtype().is(py::dtype::of<int64_t>()))
        throw std::invalid_argument("offsets" + name + ": expected a contiguous int64 array");
      if (o.shape(0) < 2) throw std::invalid_argument("offsets" + name + ": a domain has no documents");
      D.tokens = static_cast<const char*>(t.data());
      D.n_tokens = t.shape(0);
      D.offsets = static_cast<const int64_t*>(o.data());
      D.n_docs = o.shape(0) - 1;
      if (D.offsets[0] != 0 || D.offsets[D.n_docs] != D.n_tokens)
        throw std::invalid_argument("offsets" + name + ": must run from 0 to the number of tokens");
      for (int64_t i = 0; i < D.n_docs; ++i) {
        const int64_t len = D.offsets[i + 1] - D.offsets[i];
        if (len < 0 || len > static_cast<int64_t>(UINT32_MAX))
          throw std::invalid_argument("offsets" + name + ": not monotone, or a document of >= 2**32 tokens");
      }
      D.stream_len = D.n_tokens + D.n_docs;
    }
    weights_.assign(nd, 1.0 / static_cast<double>(nd));
    seq_index_.assign(nd, 0);
    window_.assign(nd, 0);
    rank_sequences_.assign(nd, 0);
    scratch_.resize(seq_len_ + 1);
    mask_scratch_.resize(seq_len_ + 1);
    read_buf_.resize((seq_len_ + 1) * 4);
  }

  // Per domain its loss mask (a contiguous uint8 array of one entry per token) or None.
  void set_masks(py::list masks, int64_t ignore_index) {
    if (masks.size() != domains_.size())
      throw std::invalid_argument("masks: expected one entry (an array or None) per domain");
    for (size_t d = 0; d < domains_.size(); ++d) {
      Domain& D = domains_[d];
      if (masks[d].is_none()) {
        D.mask_ref = py::none();
        D.mask = nullptr;
        continue;
      }
      py::array m = py::reinterpret_borrow<py::array>(masks[d]);
      if (m.ndim() != 1 || !(m.flags() & py::array::c_style) || !m.dtype().is(py::dtype::of<uint8_t>()) ||
          m.shape(0) != D.n_tokens)
        throw std::invalid_argument("masks[" + std::to_string(d) + "]: expected a uint8 array of one entry per token");
      D.mask_ref = m;
      D.mask = static_cast<const uint8_t*>(m.data());
    }
    ignore_index_ = ignore_index;
  }

  void set_weights(py::array_t<double, py::array::c_style | py::array::forcecast> w) {
    if (w.ndim() != 1 || static_cast<size_t>(w.shape(0)) != domains_.size())
      throw std::invalid_argument("weights: expected one number per domain");
    bool any_positive = false;
    for (size_t d = 0; d < domains_.size(); ++d) {
      const double x = w.data()[d];
      if (!std::isfinite(x) || x < 0) throw std::invalid_argument("weights: expected finite numbers >= 0");
      any_positive = any_positive || x > 0;
    }
    if (!any_positive) throw std::invalid_argument("weights: expected at least one weight > 0");
    std::memcpy(weights_.data(), w.data(), sizeof(double) * domains_.size());
    std::fill(window_.begin(), window_.end(), 0);
  }

  // Per domain: an open read-only descriptor of its tokens file (pread mode), or -1 (read the mapping).
  // The descriptors stay owned by Python and must outlive this object.
  void set_read_fds(py::array_t<int64_t, py::array::c_style | py::array::forcecast> fds) {
    if (fds.ndim() != 1 || static_cast<size_t>(fds.shape(0)) != domains_.size())
      throw std::invalid_argument("read fds: expected one integer per domain");
#ifndef DDK_HAVE_POSIX
    for (size_t d = 0; d < domains_.size(); ++d)
      if (fds.data()[d] >= 0) throw std::invalid_argument("pread mode needs a POSIX system");
#endif
    for (size_t d = 0; d < domains_.size(); ++d) domains_[d].fd = static_cast<int>(fds.data()[d]);
  }

  void next_batch(py::array_t<int64_t> input_ids, py::array_t<int64_t> labels, py::array_t<int64_t> domain_ids) {
    for (py::array_t<int64_t>* a : {&input_ids, &labels, &domain_ids}) {
      if (a->ndim() != 2 || a->shape(0) != batch_size_ || a->shape(1) != seq_len_ ||
          !(a->flags() & py::array::c_style) || !a->writeable())
        throw std::invalid_argument("outputs: expected writeable C-contiguous int64 [batch_size, seq_len]");
    }
    int64_t* in = input_ids.mutable_data();
    int64_t* lab = labels.mutable_data();
    int64_t* dom = domain_ids.mutable_data();
    py::gil_scoped_release release;
    const int64_t L = seq_len_, B = batch_size_, lo = rank_ * B;
    for (int64_t g = 0; g < world_size_ * B; ++g) {
      const int d = choose();
      if (seq_index_[d] >= max_index()) throw std::out_of_range("sequence index past the stream position bound");
      const int64_t k = seq_index_[d]++;
      if (g < lo || g >= lo + B) continue;  // another rank's row: only the index advances
      const int64_t row = g - lo;
      Domain& D = domains_[d];
      if (D.itemsize == 2) {
        fill<uint16_t>(D, d, k * L);
      } else {
        fill<uint32_t>(D, d, k * L);
      }
      std::memcpy(in + row * L, scratch_.data(), sizeof(int64_t) * L);
      if (D.mask == nullptr) {
        std::memcpy(lab + row * L, scratch_.data() + 1, sizeof(int64_t) * L);
      } else {  // branch-free select (vectorises): label where the mask is 1, ignore_index elsewhere
        const int64_t* __restrict src = scratch_.data() + 1;
        const uint8_t* __restrict m = mask_scratch_.data() + 1;
        int64_t* __restrict dst = lab + row * L;
        const int64_t ignore = ignore_index_;
        for (int64_t t = 0; t < L; ++t) {
          const int64_t keep = -static_cast<int64_t>(m[t] != 0);
          dst[t] = (src[t] & keep) | (ignore & ~keep);
        }
      }
      std::fill(dom + row * L, dom + (row + 1) * L, static_cast<int64_t>(d));
      rank_sequences_[d] += 1;
    }
  }

  py::tuple get_state() const {
    return py::make_tuple(to_array(seq_index_), to_array(window_), to_array(rank_sequences_));
  }

  void set_state(py::array_t<int64_t, py::array::c_style | py::array::forcecast> seq_index,
                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> window,
                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> rank_sequences) {
    const size_t nd = domains_.size();
    for (auto* a : {&seq_index, &window, &rank_sequences})
      if (a->ndim() != 1 || static_cast<size_t>(a->shape(0)) != nd)
        throw std::invalid_argument("state: expected one integer per domain");
    // Bounds before anything is copied: k * seq_len + seq_len + 1 must stay far inside int64 (a corrupt
    // seq_index would overflow it and read outside the document index), and the window sum too.
    for (size_t d = 0; d < nd; ++d) {
      if (seq_index.data()[d] < 0 || seq_index.data()[d] >= max_index())
        throw std::out_of_range("state: seq_index out of range [0, 2**62 / seq_len)");
      if (window.data()[d] < 0 || window.data()[d] > kMaxPos / static_cast<int64_t>(nd))
        throw std::out_of_range("state: window_counts out of range");
      if (rank_sequences.data()[d] < 0) throw std::out_of_range("state: sequences_per_domain < 0");
    }
    std::memcpy(seq_index_.data(), seq_index.data(), nd * sizeof(int64_t));
    std::memcpy(window_.data(), window.data(), nd * sizeof(int64_t));
    std::memcpy(rank_sequences_.data(), rank_sequences.data(), nd * sizeof(int64_t));
  }

  py::array_t<int64_t> epoch_order(int64_t d, int64_t epoch) const {  // for tests: the document order
    const Domain& D = domains_.at(d);
    const uint64_t ek = epoch_key(d, epoch);
    const std::vector<uint64_t> keys = sorted_keys(D, ek);
    py::array_t<int64_t> out(static_cast<py::ssize_t>(keys.size()));
    for (size_t j = 0; j < keys.size(); ++j) out.mutable_data()[j] = static_cast<int64_t>(unmix64(keys[j]) ^ ek);
    return out;
  }

 private:
  static py::array_t<int64_t> to_array(const std::vector<int64_t>& v) {
    py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
    std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
    return a;
  }

  int64_t max_index() const { return kMaxPos / seq_len_ - 2; }  // as MAX_STREAM_POS in sampler.py

  int choose() {
    int64_t n = 0;
    for (int64_t c : window_) n += c;
    const double n1 = static_cast<double>(n + 1);
    int best = 0;
    double best_deficit = weights_[0] * n1 - static_cast<double>(window_[0]);
    for (size_t d = 1; d < weights_.size(); ++d) {
      const double deficit = weights_[d] * n1 - static_cast<double>(window_[d]);
      if (deficit > best_deficit) {  // strict: first index wins ties, as np.argmax
        best_deficit = deficit;
        best = static_cast<int>(d);
      }
    }
    window_[best] += 1;
    return best;
  }

  uint64_t epoch_key(int64_t d, int64_t epoch) const {
    return mix64(mix64(mix64(seed_) ^ static_cast<uint64_t>(d)) ^ static_cast<uint64_t>(epoch));
  }

  static std::vector<uint64_t> sorted_keys(const Domain& D, uint64_t ek) {
    std::vector<uint64_t> keys(D.n_docs);
    for (int64_t i = 0; i < D.n_docs; ++i) keys[i] = mix64(ek ^ static_cast<uint64_t>(i));
    std::sort(keys.begin(), keys.end());  // distinct keys: the same order as numpy's argsort
    return keys;
  }

  void ensure_epoch(Domain& D, int64_t d, int64_t epoch) {
    if (D.cached_epoch == epoch) return;
    const int64_t n = D.n_docs;
    D.start = std::vector<int64_t>();  // free the previous epoch before the sort: lower peak memory
    D.length = std::vector<uint32_t>();
    const uint64_t ek = epoch_key(d, epoch);
    std::vector<uint64_t> keys = sorted_keys(D, ek);
    D.start.resize(n);
    D.length.resize(n);
    D.block_pos.assign(n / kBlock + 2, D.stream_len);
    int64_t pos = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t doc = static_cast<int64_t>(unmix64(keys[j]) ^ ek);
      if (j % kBlock == 0) D.block_pos[j / kBlock] = pos;
      D.start[j] = D.offsets[doc];
      D.length[j] = static_cast<uint32_t>(D.offsets[doc + 1] - D.offsets[doc]);
      pos += D.length[j] + 1;
    }
    D.cached_epoch = epoch;
    if (D.fd >= 0) release(D.offsets_ref.data(), (n + 1) * 8);  // read once per epoch: drop its pages
  }

  static void release(const void* base, int64_t nbytes) {
#ifdef DDK_HAVE_POSIX
    static const int64_t page = sysconf(_SC_PAGESIZE);
    const uintptr_t a = reinterpret_cast<uintptr_t>(base) & ~static_cast<uintptr_t>(page - 1);
    const uintptr_t e = reinterpret_cast<uintptr_t>(base) + nbytes;
    if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_DONTNEED);
#else
    (void)base;
    (void)nbytes;
#endif
  }

  // Read `count` tokens starting at token `first` of domain D into buf (pread mode).
  void read_tokens(const Domain& D, int64_t first, int64_t count, int itemsize, char* buf) {
#ifdef DDK_HAVE_POSIX
    int64_t done = 0, want = count * itemsize;
    while (done < want) {
      const ssize_t r = pread(D.fd, buf + done, want - done, first * itemsize + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) throw std::runtime_error("pread of a token shard failed or hit end of file (truncated shard?)");
      done += r;
    }
#else
    (void)D, (void)first, (void)count, (void)itemsize, (void)buf;
#endif
  }

  // Copy stream tokens [pos, pos + L + 1) of domain d into scratch_.
  template <typename T>
  void fill(Domain& D, int64_t d, int64_t pos) {
    const T* tok = reinterpret_cast<const T*>(D.tokens);
    int64_t* out = scratch_.data();
    const int64_t n = seq_len_ + 1;
    int64_t i = 0;
    while (i < n) {
      const int64_t epoch = pos / D.stream_len;
      const int64_t q = pos % D.stream_len;
      ensure_epoch(D, d, epoch);
      // the block holding q, then walk to the document holding it
      const int64_t b = std::upper_bound(D.block_pos.begin(), D.block_pos.end() - 1, q) - D.block_pos.begin() - 1;
      int64_t j = b * kBlock, at = D.block_pos[b];
      while (at + D.length[j] + 1 <= q) at += D.length[j++] + 1;
      int64_t off = q - at;
      const int64_t* starts = D.start.data();
      const uint32_t* lengths = D.length.data();
      while (i < n && j < D.n_docs) {
        // Documents sit at random places in the file (shuffled order): prefetch the first cache lines of
        // the documents a few pieces ahead so their DRAM/TLB misses overlap with this copy.
        if (D.fd < 0 && j + kPrefetchAhead < D.n_docs) {
          const char* ahead = reinterpret_cast<const char*>(tok + starts[j + kPrefetchAhead]);
          __builtin_prefetch(ahead);
          __builtin_prefetch(ahead + 64);
        }
        const int64_t start = starts[j];
        const int64_t len = lengths[j];
        if (off < len) {
          const int64_t take = std::min(len - off, n - i);
          const T* src = tok + start + off;
          if (D.fd >= 0) {
            read_tokens(D, start + off, take, sizeof(T), read_buf_.data());
            src = reinterpret_cast<const T*>(read_buf_.data());
          }
          int64_t* dst = out + i;
          for (int64_t t = 0; t < take; ++t) dst[t] = static_cast<int64_t>(src[t]);
          if (D.mask != nullptr) std::memcpy(mask_scratch_.data() + i, D.mask + start + off, take);
          i += take;
          pos += take;
        }
        if (i < n) {  // the document is exhausted: its separator
          mask_scratch_[i] = 0;
          out[i++] = sep_;
          pos += 1;
        }
        ++j;
        off = 0;
      }
    }
  }

  int64_t seq_len_, batch_size_, sep_;
  uint64_t seed_;
  int64_t rank_, world_size_;
  std::vector<Domain> domains_;
  std::vector<double> weights_;
  std::vector<int64_t> seq_index_, window_, rank_sequences_, scratch_;
  std::vector<uint8_t> mask_scratch_;  // loss mask of scratch_ (domains with a mask)
  int64_t ignore_index_ = -100;
  std::vector<char> read_buf_;  // pread destination, (L + 1) * 4 bytes
};

}  // namespace

PYBIND11_MODULE(_sampler_ext, m) {
  m.doc() = "C++ core of ddk_fast.data.DomainSampler (semantics: ddk_fast/data/packing.py)";
  py::class_<SamplerCore>(m, "SamplerCore")
      .def(py::init<py::list, py::list, int64_t, int64_t, int64_t, uint64_t, int64_t, int64_t>(),
           py::arg("tokens"), py::arg("offsets"), py::arg("seq_len"), py::arg("batch_size"), py::arg("sep"),
           py::arg("seed"), py::arg("rank"), py::arg("world_size"))
      .def("set_weights", &SamplerCore::set_weights)
      .def("set_read_fds", &SamplerCore::set_read_fds)
      .def("set_masks", &SamplerCore::set_masks)
      .def("next_batch", &SamplerCore::next_batch)
      .def("get_state", &SamplerCore::get_state)
      .def("set_state", &SamplerCore::set_state)
      .def("epoch_order", &SamplerCore::epoch_order);
  m.def("mix64", &mix64);
  m.def("unmix64", &unmix64);
}
