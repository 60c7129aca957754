#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "env.h"

namespace sqz {
namespace {

thread_local bool t_inside_parallel = false;

// One parallel_for call. Workers hold it by shared_ptr, so a worker that wakes late for an
// old job only finds its chunks exhausted; chunk claims and completions are counted per job
// (a shared counter reset between jobs let a late worker claim a chunk of the next job twice
// and skip the completion count, which could hang the caller).
struct Job {
  const std::function<void(int64_t)>* body = nullptr;
  int64_t total = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int i = 0; i < n_ - 1; ++i) workers_.emplace_back([this] { loop(); });
  }
  // Never destroyed (leaked on purpose): joining at process exit can deadlock in addons.

  int size() const { return n_; }

  void run(int64_t chunks, const std::function<void(int64_t)>& body) {
    std::lock_guard<std::mutex> serial(run_mutex_);
    auto job = std::make_shared<Job>();
    job->body = &body;
    job->total = chunks;
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = job;
      ++generation_;
    }
    cv_.notify_all();
    work(*job);
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return job->done.load() == job->total; });
    job_.reset();
  }

 private:
  void work(Job& job) {
    t_inside_parallel = true;
    for (;;) {
      int64_t i = job.next.fetch_add(1);
      if (i >= job.total) break;
      (*job.body)(i);
      if (job.done.fetch_add(1) + 1 == job.total) {
        std::lock_guard<std::mutex> lk(m_);  // pairs with the caller's wait
        done_cv_.notify_all();
      }
    }
    t_inside_parallel = false;
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen && job_ != nullptr; });
        seen = generation_;
        job = job_;
      }
      work(*job);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, m_;
  std::condition_variable cv_, done_cv_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool(cpu_threads());
  return *p;
}

}  // namespace

int cpu_threads() {
  static int n = [] {
    int v = env_int("SQUEEZELM_THREADS", 0);
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
