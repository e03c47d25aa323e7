//! Settles, debt, headroom and replays: what one reservation can take from the others.
