// In-process bootstrap: the ranks are threads of one process and share one state object.
//
// Collectives are rounds: each rank drops its piece into `collecting` and waits; the last
// rank to arrive swaps `collecting` with `completed`, advances the generation and wakes the
// others, who copy from `completed`. `completed` cannot be overwritten while someone still
// reads it, because the next round completes only after every rank has arrived in it, i.e.
// after every rank has finished the current one.
//
// A collective that times out or is called inconsistently fails the whole group: a late
// rank could otherwise complete a round with a piece from a rank that already gave up.
// Point-to-point messages are copied into per-(source, destination) queues, so send never
// blocks.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/bootstrap.h"
#include "core/error.h"
#include "core/log.h"
#include "core/socket.h"

namespace moecomm {
namespace {

struct Message {
  int tag;
  std::vector<char> data;
};

struct SharedState {
  SharedState(int rankCount, int64_t waitMs)
      : nranks(rankCount),
        timeoutMs(waitMs),
        present(rankCount, false),
        queues(static_cast<size_t>(rankCount) * rankCount) {}

  const int nranks;
  const int64_t timeoutMs;
  std::mutex mutex;
  std::condition_variable changed;
  bool aborted = false;

  // The collective round in progress.
  uint64_t generation = 0;
  int arrived = 0;
  int roundOpener = -1;  // first rank of the round, named when another rank disagrees
  const char* roundOp = nullptr;
  size_t roundBytes = 0;
  std::vector<bool> present;
  std::vector<char> collecting;
  std::vector<char> completed;
  // Set once, by the first collective that failed; every later collective reports it.
  moecommResult_t failure = moecommSuccess;
  std::string failureText;

  std::vector<std::deque<Message>> queues;  // [source * nranks + destination]

  std::string missingRanks() const {
    std::string text;
    int count = 0;
    for (int r = 0; r < nranks; ++r) {
      if (present[r]) continue;
      text += (text.empty() ? "" : ", ") + std::to_string(r);
      ++count;
    }
    return (count == 1 ? "rank " : "ranks ") + text;
  }
};

class InProcessBootstrap final : public Bootstrap {
 public:
  InProcessBootstrap(int rank, std::shared_ptr<SharedState> state)
      : Bootstrap(rank, state->nranks), state_(std::move(state)) {}

  moecommResult_t allgather(const void* send, void* recv, size_t bytes) override {
    MC_REQUIRE(bytes == 0 || (send != nullptr && recv != nullptr), moecommInvalidArgument,
               "rank %d: allgather of %zu bytes with a NULL buffer", rank(), bytes);
    return collective("allgather", send, recv, bytes);
  }
  moecommResult_t barrier() override { return collective("barrier", nullptr, nullptr, 0); }
  moecommResult_t send(int peer, int tag, const void* data, size_t bytes) override;
  moecommResult_t recv(int peer, int tag, void* data, size_t bytes) override;
  void abort() override {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->aborted = true;
    state_->changed.notify_all();
  }

 private:
  moecommResult_t collective(const char* op, const void* send, void* recv, size_t bytes);
  moecommResult_t failGroup(std::unique_lock<std::mutex>& lock, moecommResult_t code, const char* text);

  std::shared_ptr<SharedState> state_;
};

// Records the group's failure (under the lock) and wakes everyone who waits on this round.
moecommResult_t InProcessBootstrap::failGroup(std::unique_lock<std::mutex>& lock, moecommResult_t code,
                                              const char* text) {
  (void)lock;
  SharedState& s = *state_;
  if (s.failure == moecommSuccess) {
    s.failure = code;
    s.failureText = text;
  }
  s.changed.notify_all();
  return setError(code, "%s", text);
}

moecommResult_t InProcessBootstrap::collective(const char* op, const void* send, void* recv, size_t bytes) {
  SharedState& s = *state_;
  std::unique_lock<std::mutex> lock(s.mutex);
  MC_REQUIRE(!s.aborted, moecommInvalidUsage, "rank %d: the bootstrap was aborted; %s is not possible any more", rank(),
             op);
  MC_REQUIRE(s.failure == moecommSuccess, s.failure,
             "rank %d: %s is not possible after an earlier bootstrap failure: %s", rank(), op, s.failureText.c_str());
  char text[512];
  if (s.present[rank()]) {
    std::snprintf(text, sizeof(text), "rank %d entered %s twice in one round; one thread per rank", rank(), op);
    return failGroup(lock, moecommInvalidUsage, text);
  }
  if (s.arrived == 0) {
    s.roundOpener = rank();
    s.roundOp = op;
    s.roundBytes = bytes;
    s.collecting.resize(bytes * s.nranks);
  } else if (std::strcmp(s.roundOp, op) != 0 || s.roundBytes != bytes) {
    std::snprintf(text, sizeof(text),
                  "rank %d called %s with %zu bytes while rank %d called %s with %zu bytes; every rank must call the "
                  "same collectives in the same order with the same size",
                  rank(), op, bytes, s.roundOpener, s.roundOp, s.roundBytes);
    return failGroup(lock, moecommInternalError, text);
  }
  if (bytes > 0) std::memcpy(s.collecting.data() + rank() * bytes, send, bytes);
  s.present[rank()] = true;
  const uint64_t myGeneration = s.generation;
  if (++s.arrived == s.nranks) {
    s.collecting.swap(s.completed);
    s.arrived = 0;
    s.present.assign(s.nranks, false);
    ++s.generation;
    s.changed.notify_all();
  } else {
    const auto deadline = SteadyClock::now() + std::chrono::milliseconds(s.timeoutMs);
    while (s.generation == myGeneration && !s.aborted && s.failure == moecommSuccess) {
      if (s.changed.wait_until(lock, deadline) == std::cv_status::timeout && s.generation == myGeneration &&
          !s.aborted && s.failure == moecommSuccess) {
        std::snprintf(text, sizeof(text), "rank %d waited %lld ms for %s during %s", rank(),
                      static_cast<long long>(s.timeoutMs), s.missingRanks().c_str(), op);
        return failGroup(lock, moecommTimeout, text);
      }
    }
    // A round that completed counts even if an abort or failure came right after it.
    if (s.generation == myGeneration) {
      MC_REQUIRE(!s.aborted, moecommInvalidUsage, "rank %d: the bootstrap was aborted during %s", rank(), op);
      return setError(s.failure, "rank %d: %s failed: %s", rank(), op, s.failureText.c_str());
    }
  }
  if (bytes > 0) std::memcpy(recv, s.completed.data(), bytes * s.nranks);
  return moecommSuccess;
}

moecommResult_t InProcessBootstrap::send(int peer, int tag, const void* data, size_t bytes) {
  SharedState& s = *state_;
  MC_REQUIRE(peer >= 0 && peer < nranks(), moecommInvalidArgument, "rank %d: send to rank %d, outside 0..%d", rank(),
             peer, nranks() - 1);
  MC_REQUIRE(bytes == 0 || data != nullptr, moecommInvalidArgument, "rank %d: send of %zu bytes from NULL", rank(),
             bytes);
  const char* p = static_cast<const char*>(data);
  Message message{tag, std::vector<char>(p, p + bytes)};  // copied outside the lock
  std::lock_guard<std::mutex> lock(s.mutex);
  MC_REQUIRE(!s.aborted, moecommInvalidUsage, "rank %d: the bootstrap was aborted; send is not possible any more",
             rank());
  s.queues[static_cast<size_t>(rank()) * s.nranks + peer].push_back(std::move(message));
  s.changed.notify_all();
  return moecommSuccess;
}

moecommResult_t InProcessBootstrap::recv(int peer, int tag, void* data, size_t bytes) {
  SharedState& s = *state_;
  MC_REQUIRE(peer >= 0 && peer < nranks(), moecommInvalidArgument, "rank %d: recv from rank %d, outside 0..%d", rank(),
             peer, nranks() - 1);
  MC_REQUIRE(bytes == 0 || data != nullptr, moecommInvalidArgument, "rank %d: recv of %zu bytes into NULL", rank(),
             bytes);
  std::unique_lock<std::mutex> lock(s.mutex);
  std::deque<Message>& queue = s.queues[static_cast<size_t>(peer) * s.nranks + rank()];
  // Only this thread could send to itself, so waiting would never end.
  MC_REQUIRE(peer != rank() || !queue.empty(), moecommInvalidUsage,
             "rank %d: recv from itself (tag %d) with no message from itself pending", rank(), tag);
  const auto deadline = SteadyClock::now() + std::chrono::milliseconds(s.timeoutMs);
  while (queue.empty() && !s.aborted) {
    if (s.changed.wait_until(lock, deadline) == std::cv_status::timeout && queue.empty() && !s.aborted) {
      return setError(moecommTimeout, "rank %d waited %lld ms for rank %d during recv (tag %d, %zu bytes)", rank(),
                      static_cast<long long>(s.timeoutMs), peer, tag, bytes);
    }
  }
  MC_REQUIRE(!s.aborted, moecommInvalidUsage, "rank %d: the bootstrap was aborted during recv", rank());
  const Message& front = queue.front();
  // The message stays queued: the mismatch is a bug in the caller, and dropping data would
  // make what follows harder to understand.
  MC_REQUIRE(front.tag == tag && front.data.size() == bytes, moecommInternalError,
             "rank %d expected a message with tag %d of %zu bytes from rank %d but received tag %d of %zu bytes; "
             "sends and receives must match in order",
             rank(), tag, bytes, peer, front.tag, front.data.size());
  if (bytes > 0) std::memcpy(data, front.data.data(), bytes);
  queue.pop_front();
  return moecommSuccess;
}

}  // namespace

moecommResult_t bootstrapCreateInProcess(int nranks, int timeoutMs, std::vector<std::unique_ptr<Bootstrap>>* out) {
  MC_REQUIRE(out != nullptr, moecommInvalidArgument, "bootstrap output pointer is NULL");
  MC_REQUIRE(nranks >= 1, moecommInvalidArgument, "nranks is %d; it must be at least 1", nranks);
  auto state = std::make_shared<SharedState>(nranks, bootstrapTimeoutMs(timeoutMs));
  std::vector<std::unique_ptr<Bootstrap>> bootstraps;
  bootstraps.reserve(nranks);
  for (int r = 0; r < nranks; ++r) bootstraps.push_back(std::make_unique<InProcessBootstrap>(r, state));
  *out = std::move(bootstraps);
  MC_TRACE(kLogBootstrap, "in-process bootstrap for %d ranks", nranks);
  return moecommSuccess;
}

}  // namespace moecomm
