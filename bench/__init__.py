"""xlat benchmarks (`make bench`): media, control, SIP and scale figures measured side
by side with rtpengine, Kamailio and plain kernel forwarding in one run."""
