#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace sqz {
namespace {

thread_local bool t_inside_parallel = false;

class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int i = 0; i < n_ - 1; ++i) workers_.emplace_back([this] { loop(); });
  }
  // Never destroyed (leaked on purpose): joining at process exit can deadlock in addons.

  int size() const { return n_; }

  void run(int64_t chunks, const std::function<void(int64_t)>& body) {
    std::lock_guard<std::mutex> serial(run_mutex_);
    {
      std::lock_guard<std::mutex> lk(m_);
      body_ = &body;
      total_ = chunks;
      next_.store(0);
      done_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return done_ == total_; });
    body_ = nullptr;
  }

 private:
  void work() {
    t_inside_parallel = true;
    int64_t finished = 0;
    for (;;) {
      int64_t i = next_.fetch_add(1);
      if (i >= total_) break;
      (*body_)(i);
      ++finished;
    }
    t_inside_parallel = false;
    if (finished) {
      std::lock_guard<std::mutex> lk(m_);
      done_ += finished;
      if (done_ == total_) done_cv_.notify_all();
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen && body_ != nullptr; });
        seen = generation_;
      }
      work();
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t total_ = 0, done_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t generation_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool(cpu_threads());
  return *p;
}

}  // namespace

int cpu_threads() {
  static int n = [] {
    const char* env = std::getenv("SQUEEZELM_THREADS");
    int v = env ? std::atoi(env) : 0;
    if (v <= 0) v = (int)std::thread::hardware_concurrency();
    return std::max(1, std::min(v, 256));
  }();
  return n;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int threads = cpu_threads();
  if (t_inside_parallel || threads == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  // A few chunks per thread balance uneven work without much overhead.
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, (int64_t)threads * 4);
  int64_t per = (n + chunks - 1) / chunks;
  chunks = (n + per - 1) / per;
  std::function<void(int64_t)> body = [&](int64_t c) {
    int64_t b = c * per, e = std::min(n, b + per);
    if (b < e) fn(b, e);
  };
  pool().run(chunks, body);
}

}  // namespace sqz
