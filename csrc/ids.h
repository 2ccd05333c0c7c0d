// Ids of the relation losses, MI bounds and vocabulary-KD divergences and teachers as the kernels
// receive them. The Python table is kernels/ids.py; bindings.cpp exports these as
// pykd._C.RELATION_LOSS_IDS, MI_BOUND_IDS, VOCAB_DIVERGENCE_IDS and VOCAB_TEACHER_IDS, and
// tests/test_ids.py checks that Python, C++ and the Triton kernels agree name by name.
#pragma once

#include <array>
#include <cstdint>
#include <utility>

namespace pykd {

enum class RelationLoss : int64_t { kKL = 0, kCE = 1, kMseProb = 2, kMseLogit = 3 };

inline constexpr std::array<std::pair<const char*, RelationLoss>, 4> kRelationLossNames{{
    {"kl", RelationLoss::kKL},
    {"ce", RelationLoss::kCE},
    {"mse_prob", RelationLoss::kMseProb},
    {"mse_logit", RelationLoss::kMseLogit},
}};

enum class Bound : int64_t { kInfoNCE = 0, kNWJ = 1, kTUBA = 2, kJS = 3, kAlpha = 4 };

inline constexpr std::array<std::pair<const char*, Bound>, 5> kBoundNames{{
    {"infonce", Bound::kInfoNCE},
    {"nwj", Bound::kNWJ},
    {"tuba", Bound::kTUBA},
    {"js", Bound::kJS},
    {"alpha", Bound::kAlpha},
}};

enum class VocabDivergence : int64_t { kKL = 0, kSoftCE = 1, kReverseKL = 2, kJSD = 3 };

inline constexpr std::array<std::pair<const char*, VocabDivergence>, 4> kVocabDivergenceNames{{
    {"kl", VocabDivergence::kKL},
    {"soft_ce", VocabDivergence::kSoftCE},
    {"reverse_kl", VocabDivergence::kReverseKL},
    {"jsd", VocabDivergence::kJSD},
}};

enum class VocabTeacher : int64_t { kProjected = 0, kLogits = 1, kTopK = 2 };

inline constexpr std::array<std::pair<const char*, VocabTeacher>, 3> kVocabTeacherNames{{
    {"projected", VocabTeacher::kProjected},
    {"logits", VocabTeacher::kLogits},
    {"topk", VocabTeacher::kTopK},
}};

// An id the kernels know: one of the table's values (ids need not be 0..N-1 in table order).
template <typename Enum, size_t N>
bool known_id(const std::array<std::pair<const char*, Enum>, N>& table, int64_t id) {
  for (const auto& entry : table)
    if (static_cast<int64_t>(entry.second) == id) return true;
  return false;
}

}  // namespace pykd
