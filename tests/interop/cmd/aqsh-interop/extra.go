package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
)

// golden writes protobuf bytes produced by the Go library, read back from Redis, plus the field
// values the Go Inspector reports for them, so Python can check its decoder against Go's writer.
func golden(opt asynq.RedisConnOpt, out string) {
	if out == "" {
		fail("-out is required")
	}
	ctx := context.Background()
	rdb := redisClient(opt)
	must(0, rdb.FlushAll(ctx).Err())
	client := asynq.NewClient(opt)
	defer client.Close()
	insp := asynq.NewInspector(opt)
	defer insp.Close()
	expected := map[string]any{}
	save := func(name string, raw []byte, fields any) {
		if err := os.WriteFile(filepath.Join(out, name+".bin"), raw, 0o644); err != nil {
			fail(err.Error())
		}
		expected[name] = fields
	}
	hget := func(key, field string) []byte {
		return []byte(must(rdb.HGet(ctx, key, field).Result()))
	}

	// A client-written message with every client-settable field.
	full := asynq.NewTaskWithHeaders("golden:full", []byte("payload \x00\xff bytes"),
		map[string]string{"trace": "abc", "ünï": "cödé"})
	info := must(client.Enqueue(full, asynq.Queue("golden"), asynq.MaxRetry(7),
		asynq.TaskID("golden-full"), asynq.Timeout(90*time.Second),
		asynq.Deadline(time.Unix(4102444800, 0)), asynq.Unique(time.Hour),
		asynq.ProcessIn(time.Hour), asynq.Retention(2*time.Hour)))
	save("task_full", hget("asynq:{golden}:t:golden-full", "msg"), taskJSON(must(insp.GetTaskInfo("golden", info.ID))))
	grouped := must(client.Enqueue(asynq.NewTask("golden:group", nil), asynq.Queue("golden"),
		asynq.TaskID("golden-group"), asynq.Group("g1")))
	save("task_group", hget("asynq:{golden}:t:golden-group", "msg"), taskJSON(must(insp.GetTaskInfo("golden", grouped.ID))))

	// Server-written fields: retried/error_msg/last_failed_at (retry) and completed_at.
	must(client.Enqueue(asynq.NewTask("fail:golden", []byte("f")), asynq.Queue("golden"),
		asynq.TaskID("golden-retry"), asynq.MaxRetry(5)))
	must(client.Enqueue(asynq.NewTask("result:golden", []byte("r")), asynq.Queue("golden"),
		asynq.TaskID("golden-done"), asynq.Retention(time.Hour)))
	must(client.Enqueue(asynq.NewTask("sleep:3000", []byte("w")), asynq.Queue("golden"),
		asynq.TaskID("golden-running")))
	srv := asynq.NewServer(opt, asynq.Config{
		Concurrency: 5, Queues: map[string]int{"golden": 1}, LogLevel: asynq.WarnLevel,
		RetryDelayFunc: func(int, error, *asynq.Task) time.Duration { return time.Hour },
	})
	release := make(chan struct{})
	handler := asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		switch t.Type() {
		case "fail:golden":
			return errors.New("golden failure")
		case "result:golden":
			_, err := t.ResultWriter().Write([]byte("golden result"))
			return err
		}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	must(0, srv.Start(handler))
	waitFor(func() bool {
		servers, _ := insp.Servers()
		retry, _ := rdb.ZScore(ctx, "asynq:{golden}:retry", "golden-retry").Result()
		done, _ := rdb.ZScore(ctx, "asynq:{golden}:completed", "golden-done").Result()
		return len(servers) == 1 && len(servers[0].ActiveWorkers) == 1 && retry > 0 && done > 0
	})
	save("task_retry", hget("asynq:{golden}:t:golden-retry", "msg"), taskJSON(must(insp.GetTaskInfo("golden", "golden-retry"))))
	save("task_completed", hget("asynq:{golden}:t:golden-done", "msg"), taskJSON(must(insp.GetTaskInfo("golden", "golden-done"))))
	servers := must(insp.Servers())
	s := servers[0]
	serverKey := fmt.Sprintf("asynq:servers:{%s:%d:%s}", s.Host, s.PID, s.ID)
	save("server_info", []byte(must(rdb.Get(ctx, serverKey).Result())), map[string]any{
		"host": s.Host, "pid": s.PID, "server_id": s.ID, "concurrency": s.Concurrency,
		"queues": s.Queues, "strict_priority": s.StrictPriority, "status": s.Status,
		"start_time_s": s.Started.Unix(), "active_worker_count": len(s.ActiveWorkers),
	})
	workersKey := fmt.Sprintf("asynq:workers:{%s:%d:%s}", s.Host, s.PID, s.ID)
	w := s.ActiveWorkers[0]
	save("worker_info", []byte(must(rdb.HGet(ctx, workersKey, w.TaskID).Result())), map[string]any{
		"host": s.Host, "pid": s.PID, "server_id": s.ID, "task_id": w.TaskID,
		"task_type": w.TaskType, "task_payload": string(w.TaskPayload), "queue": w.Queue,
		"start_time_s": w.Started.Unix(), "deadline_s": w.Deadline.Unix(),
	})
	close(release)
	srv.Shutdown()

	// Scheduler entries (never fired → Go zero time) and enqueue events.
	sched := asynq.NewScheduler(opt, &asynq.SchedulerOpts{LogLevel: asynq.WarnLevel})
	entryID := must(sched.Register("@every 1s", asynq.NewTask("golden:cron", []byte("c")), asynq.Queue("golden")))
	must(sched.Register("@every 1h", asynq.NewTask("golden:hourly", nil), asynq.Queue("golden"), asynq.MaxRetry(2)))
	must(0, sched.Start())
	waitFor(func() bool {
		n, _ := rdb.ZCard(ctx, "asynq:scheduler_history:"+entryID).Result()
		m, _ := rdb.ZCard(ctx, "asynq:schedulers").Result()
		return n > 0 && m > 0
	})
	entries := must(insp.SchedulerEntries())
	schedKeys := must(rdb.ZRange(ctx, "asynq:schedulers", 0, -1).Result())
	rawEntries := must(rdb.LRange(ctx, schedKeys[0], 0, -1).Result())
	for idx, raw := range rawEntries {
		// Match raw list elements to Inspector entries by the entry id they contain.
		for _, e := range entries {
			if containsBytes(raw, e.ID) {
				prev := int64(0)
				if !e.Prev.IsZero() {
					prev = e.Prev.Unix()
				}
				save("scheduler_entry_"+strconv.Itoa(idx), []byte(raw), map[string]any{
					"id": e.ID, "spec": e.Spec, "task_type": e.Task.Type(),
					"task_payload": string(e.Task.Payload()), "next_s": e.Next.Unix(),
					"prev_s": prev, "prev_is_zero": e.Prev.IsZero(), "options": len(e.Opts),
				})
			}
		}
	}
	events := must(rdb.ZRange(ctx, "asynq:scheduler_history:"+entryID, 0, 0).Result())
	listed := must(insp.ListSchedulerEnqueueEvents(entryID))
	save("enqueue_event", []byte(events[0]), map[string]any{
		"task_id": listed[len(listed)-1].TaskID, "enqueue_time_s": listed[len(listed)-1].EnqueuedAt.Unix(),
	})
	sched.Shutdown()
	data, _ := json.MarshalIndent(expected, "", "  ")
	must(0, os.WriteFile(filepath.Join(out, "golden.json"), data, 0o644))
	emit(map[string]any{"ok": true, "files": len(expected)})
}

func containsBytes(haystack, needle string) bool {
	return len(needle) > 0 && len(haystack) >= len(needle) && (func() bool {
		for i := 0; i+len(needle) <= len(haystack); i++ {
			if haystack[i:i+len(needle)] == needle {
				return true
			}
		}
		return false
	})()
}

func waitFor(cond func() bool) {
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			fail("timed out waiting")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// benchEnqueue: the Go client enqueueing n tasks from `concurrency` goroutines.
func benchEnqueue(opt asynq.RedisConnOpt, n, concurrency int) {
	client := asynq.NewClient(opt)
	defer client.Close()
	var next int64
	var wg sync.WaitGroup
	start := time.Now()
	for g := 0; g < concurrency; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for atomic.AddInt64(&next, 1) <= int64(n) {
				if _, err := client.Enqueue(asynq.NewTask("bench:noop", []byte("x")), asynq.Queue("bench-go")); err != nil {
					fail(err.Error())
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	emit(map[string]any{"tasks": n, "concurrency": concurrency, "seconds": elapsed, "tasks_per_s": float64(n) / elapsed})
}

// benchProcess: a Go server draining n pre-enqueued no-op tasks; time from start to the last ack.
func benchProcess(opt asynq.RedisConnOpt, queue string, n, concurrency int) {
	ctx := context.Background()
	rdb := redisClient(opt)
	var done int64
	finished := make(chan time.Time, 1)
	srv := asynq.NewServer(opt, asynq.Config{
		Concurrency: concurrency, Queues: map[string]int{queue: 1}, LogLevel: asynq.ErrorLevel,
	})
	start := time.Now()
	must(0, srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		if atomic.AddInt64(&done, 1) == int64(n) {
			finished <- time.Now()
		}
		return nil
	})))
	var end time.Time
	select {
	case end = <-finished:
	case <-time.After(10 * time.Minute):
		fail("bench-process timed out")
	}
	// Wait for acks to land so the measured span covers the Redis writes too.
	key := fmt.Sprintf("asynq:{%s}:active", queue)
	waitFor(func() bool { l, _ := rdb.LLen(ctx, key).Result(); return l == 0 })
	end = time.Now()
	srv.Shutdown()
	elapsed := end.Sub(start).Seconds()
	emit(map[string]any{"tasks": n, "concurrency": concurrency, "seconds": elapsed, "tasks_per_s": float64(n) / elapsed})
}

// benchPickup: an idle Go server; enqueue → handler start latency, from a timestamp payload.
func benchPickup(opt asynq.RedisConnOpt, n int) {
	client := asynq.NewClient(opt)
	defer client.Close()
	latencies := make(chan float64, n)
	srv := asynq.NewServer(opt, asynq.Config{
		Concurrency: 4, Queues: map[string]int{"pickup-go": 1}, LogLevel: asynq.ErrorLevel,
	})
	must(0, srv.Start(asynq.HandlerFunc(func(_ context.Context, t *asynq.Task) error {
		sent, _ := strconv.ParseInt(string(t.Payload()), 10, 64)
		latencies <- float64(time.Now().UnixNano()-sent) / 1e6
		return nil
	})))
	time.Sleep(2 * time.Second) // let the server go idle
	var got []float64
	for i := 0; i < n; i++ {
		payload := strconv.FormatInt(time.Now().UnixNano(), 10)
		must(client.Enqueue(asynq.NewTask("pickup", []byte(payload)), asynq.Queue("pickup-go")))
		got = append(got, <-latencies)
		time.Sleep(time.Duration(100+i%7*37) * time.Millisecond) // idle gap, not phase-locked
	}
	srv.Shutdown()
	sort.Float64s(got)
	emit(map[string]any{"n": n, "p50_ms": got[len(got)/2], "p99_ms": got[(len(got)*99)/100]})
}
