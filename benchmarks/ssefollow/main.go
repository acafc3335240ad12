// Command ssefollow is the SSE load generator of benchmarks/api.py: N followers of one task's
// log stream (GET /tasks/{id}/logs), each line of which holds its send time in nanoseconds
// (the same machine's clock). It prints one JSON line: events, p50/p99 latency, completions.
//
// Why Go and not the Python client it replaces: on a 2-core machine 500 asyncio followers in
// Python cost about as much CPU as the server they measure, so the figure was mostly the
// client's own queueing. Here parsing a line is a few hundred nanoseconds, and the goroutines
// spread over every core. Standard library only.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"
)

type result struct {
	Clients      int      `json:"clients"`
	Events       int      `json:"events"`
	Complete     int      `json:"complete"`
	Gaps         int      `json:"gaps"`
	Failures     int      `json:"failures"`
	FirstFailure []string `json:"first_failure"`
	P50Ms        float64  `json:"p50_ms"`
	P99Ms        float64  `json:"p99_ms"`
	MaxMs        float64  `json:"max_ms"`
}

// follower is one client's tally; merged after all have ended (no shared lock per event).
type follower struct {
	latenciesNs []int64
	complete    bool
	gaps        int
	err         error
}

var (
	eventPrefix = []byte("event:")
	dataPrefix  = []byte("data:")
)

// follow reads one stream to its `event: eof` (or an error), timing every message event.
func follow(client *http.Client, url string, connected *sync.WaitGroup, out *follower) {
	signalled := false
	defer func() {
		if !signalled {
			connected.Done()
		}
	}()
	resp, err := client.Get(url)
	if err != nil {
		out.err = err
		return
	}
	defer resp.Body.Close()
	connected.Done()
	signalled = true
	if resp.StatusCode != http.StatusOK {
		out.err = fmt.Errorf("HTTP %d", resp.StatusCode)
		return
	}
	reader := bufio.NewReaderSize(resp.Body, 64*1024)
	event := ""
	for {
		line, err := reader.ReadSlice('\n')
		if err != nil {
			out.err = fmt.Errorf("stream ended before eof: %w", err)
			return
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0:
			event = "" // the blank line ends an event
		case bytes.HasPrefix(line, eventPrefix):
			event = string(bytes.TrimSpace(line[len(eventPrefix):]))
		case bytes.HasPrefix(line, dataPrefix):
			switch event {
			case "eof":
				out.complete = true
				return
			case "gap":
				out.gaps++
			case "":
				sent, perr := strconv.ParseInt(string(bytes.TrimSpace(line[len(dataPrefix):])), 10, 64)
				if perr != nil {
					out.err = fmt.Errorf("not a send time: %q", line)
					return
				}
				out.latenciesNs = append(out.latenciesNs, time.Now().UnixNano()-sent)
			}
		}
	}
}

func percentileMs(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return -1
	}
	index := int(q / 100 * float64(len(sorted)-1))
	return float64(sorted[index]) / 1e6
}

func main() {
	base := flag.String("url", "http://127.0.0.1:8080", "the API's base URL")
	task := flag.String("task", "", "the task whose logs to follow")
	clients := flag.Int("clients", 1, "followers (one connection each)")
	timeout := flag.Duration("timeout", 5*time.Minute, "give up on a stream after this long")
	byLine := flag.Bool("by-line", false, "also print, per line of the log, its slowest delivery (stderr)")
	flag.Parse()
	if *task == "" {
		fmt.Fprintln(os.Stderr, "ssefollow: -task is required")
		os.Exit(2)
	}
	transport := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		MaxIdleConnsPerHost: *clients,
		DisableCompression:  true,
	}
	client := &http.Client{Transport: transport, Timeout: *timeout}
	url := fmt.Sprintf("%s/tasks/%s/logs", *base, *task)

	followers := make([]follower, *clients)
	var connected, done sync.WaitGroup
	connected.Add(*clients)
	done.Add(*clients)
	for i := range followers {
		go func(f *follower) {
			defer done.Done()
			follow(client, url, &connected, f)
		}(&followers[i])
	}
	connected.Wait()
	// Headers are in for every follower: the stream is open (the task's first lines come
	// later; benchmarks/api.py makes the script wait before it prints).
	fmt.Fprintf(os.Stderr, "ssefollow: %d followers connected\n", *clients)
	done.Wait()

	out := result{Clients: *clients, FirstFailure: []string{}}
	var all []int64
	for i := range followers {
		f := &followers[i]
		all = append(all, f.latenciesNs...)
		out.Gaps += f.gaps
		if f.complete {
			out.Complete++
		}
		if f.err != nil {
			out.Failures++
			if len(out.FirstFailure) == 0 {
				out.FirstFailure = append(out.FirstFailure, f.err.Error())
			}
		}
	}
	if *byLine {
		for n := 0; ; n++ {
			slowest, seen := int64(0), false
			for i := range followers {
				if n < len(followers[i].latenciesNs) {
					seen = true
					slowest = max(slowest, followers[i].latenciesNs[n])
				}
			}
			if !seen {
				break
			}
			fmt.Fprintf(os.Stderr, "line %d: slowest %.1f ms\n", n, float64(slowest)/1e6)
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	out.Events = len(all)
	out.P50Ms = percentileMs(all, 50)
	out.P99Ms = percentileMs(all, 99)
	out.MaxMs = percentileMs(all, 100)
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}
