"""Synthetic TL;DR: an offline stand-in for the summarize-from-feedback data, with a known gold judge.

The pipeline (SFT -> reward model -> PPO) normally reads two hub datasets. This module writes, deterministically
from a seed, a synthetic corpus in exactly their schemas, as local folders the stage scripts read with `--dataset`:

    <out_dir>/sft/{train,validation,test}.jsonl     like vwxyzjn/summarize_from_feedback_tldr_3_filtered
        id, subreddit, title, post, summary                     (summary without a leading space)
    <out_dir>/comparisons/{train,validation}.jsonl  like openai/summarize_from_feedback, config "comparisons"
        info{id, post, title, subreddit, site, article}, summaries[{text, policy, note}] (2, texts with a leading
        space), choice, worker, batch, split ("train", "valid1", "valid2"), extra{confidence}
    <out_dir>/meta.json                             seed, sizes, label temperature, label agreement
    <out_dir>/stats.{json,png}                      with --stats: win rates, agreement, token lengths (see corpus_stats)
    <out_dir>/model_comparisons/<split>.jsonl       with --samples: a model's samples labelled by the same judge

Every post is rendered from a latent story: a subreddit, a person and their relation to the narrator, an event,
a complication and the question asked, plus irrelevant filler (asides, backstory, edits). The story is a pure
function of the post id and subreddit, so `gold_score` recovers the facts from a row and needs nothing else.
Reference summaries are written from the latent facts. Comparison pairs contrast the reference with systematic
variants of it ("drop_fact", "invent_fact", "filler", "truncated", "repetitive") and are labelled by the gold
judge through a Bradley-Terry noise model whose temperature is calibrated so that labels agree with the
noiseless gold preference about 73% of the time, the human inter-annotator agreement on TL;DR.

    python benchmark/offline/tldr_synth.py --out_dir data/tldr_synth --seed 0 --stats
    # label a model's samples
    python benchmark/offline/tldr_synth.py --out_dir data/tldr_synth --samples sft_samples.jsonl
"""

import argparse
import csv
import functools
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Constants of the task
# ---------------------------------------------------------------------------------------------------------------

# Gold judge (see `gold_score`).
LENGTH_BUDGET_WORDS = 40  # words (whitespace-separated) a summary may use before the length penalty starts
LENGTH_PENALTY = 0.02  # per word beyond the budget
HALLUCINATION_PENALTY = 0.3  # per distinct invented concept
REPETITION_PENALTY = 1.0  # times the fraction of repeated word trigrams
CONCISENESS_PENALTY = 0.001  # per character of the stripped summary: breaks ties between equally complete summaries
EMPTY_SCORE = -1.0  # score of a summary without any word

# Noise model of the preference labels (see `label_probability`).
TARGET_AGREEMENT = 0.73  # agreement of labels with the noiseless gold preference (TL;DR inter-annotator agreement)
REF_PAIR_RATE = 0.65  # share of comparison pairs that put the reference against a variant (else variant vs variant)

# Reference summaries: written by people, so not all of them are complete or concise. Each reference has one
# flaw drawn from this distribution (see `reference_flaw`); the "complete" summary of every post has none.
REFERENCE_FLAWS = {
    "none": 0.40,  # every key fact, concisely: the complete summary itself
    "missing_fact": 0.25,  # the person, the complication or the question left out
    "vague_event": 0.15,  # the event replaced by a vague clause ("my bf did something that really hurt me")
    "rambling": 0.20,  # the complete summary plus 1-2 irrelevant asides
}

# Corpus shape.
BACKSTORY_RATE = 0.08  # share of posts with a backstory or edits of 8-36 extra sentences (a third exceed 512 tokens)
FILLER_COUNTS = (0, 0, 0, 1, 1, 1, 2, 2, 3, 4)  # irrelevant asides in a post, drawn uniformly from this tuple
N_WORKERS = 64  # simulated labellers
QUERY_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
DEFAULT_SIZES = {"n_sft_train": 2000, "n_sft_validation": 200, "n_sft_test": 200,
                 "n_cmp_train": 2000, "n_cmp_validation": 400}
VARIANTS = ("drop_fact", "invent_fact", "filler", "truncated", "repetitive")
POLICIES = ("ref", "complete") + VARIANTS  # "ref": the human-like reference; "complete": no flaw
FACT_KINDS = ("person", "event", "complication", "ask")

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary: every fact is a concept with accepted surface forms. Templates use the slots {p} ("my boyfriend"),
# {he}, {him}, {his}, {amount}; a concept's post and summary templates always contain one of its forms, and no
# template or filler sentence contains a form of another concept (tests check this on many stories).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """One latent fact type and the ways to say it."""

    key: str
    forms: tuple[str, ...]  # accepted surface forms (lowercase, matched as whole words; plural "s"/"es"/"'s" allowed)
    post: tuple[str, ...] = ()  # sentence templates for the post (persons: the names used in posts)
    tldr: tuple[str, ...] = ()  # clause templates for summaries (persons: the names used in summaries)
    title: tuple[str, ...] = ()  # title phrases (only "TIFU by ..." events need their own)
    persons: tuple[str, ...] = ()  # persons this concept fits; empty: any person of the family
    gender: str = ""  # persons only: "M", "F" or "" (either)
    amount: tuple[int, int, int] = (0, 0, 1)  # dollar amount range (low, high, step) for {amount}


def _person(key: str, gender: str, forms: tuple[str, ...], post: tuple[str, ...], tldr: tuple[str, ...]) -> Concept:
    return Concept(key, forms, post=post, tldr=tldr, gender=gender)


PERSONS = (
    _person("boyfriend", "M", ("boyfriend", "bf"), ("boyfriend",), ("boyfriend", "bf", "BF")),
    _person("girlfriend", "F", ("girlfriend", "gf"), ("girlfriend",), ("girlfriend", "gf", "GF")),
    _person("husband", "M", ("husband", "hubby"), ("husband",), ("husband", "hubby")),
    _person("wife", "F", ("wife",), ("wife",), ("wife",)),
    _person("mom", "F", ("mom", "mum", "mother"), ("mom", "mother"), ("mom", "mum")),
    _person("dad", "M", ("dad", "father"), ("dad", "father"), ("dad",)),
    _person("sister", "F", ("sister", "sis"), ("sister",), ("sister", "sis")),
    _person("brother", "M", ("brother", "bro"), ("brother",), ("brother", "bro")),
    _person("best_friend", "", ("best friend", "bff", "bestie"), ("best friend",), ("best friend", "bff", "bestie")),
    _person("roommate", "", ("roommate", "roomie", "flatmate"), ("roommate", "flatmate"), ("roommate", "roomie")),
    _person("boss", "", ("boss", "manager", "supervisor"), ("boss", "manager"), ("boss", "manager")),
    _person("coworker", "", ("coworker", "co-worker", "colleague"), ("coworker", "colleague"),
            ("coworker", "colleague")),
    _person("landlord", "", ("landlord",), ("landlord",), ("landlord",)),
    _person("neighbor", "", ("neighbor", "neighbour"), ("neighbor",), ("neighbor", "neighbour")),
)

EVENTS = (
    # partner
    Concept("forgot_birthday", ("birthday", "bday"),
            post=("Last week was my birthday and {p} completely forgot about it. No card, no call, nothing.",
                  "{p} forgot my birthday this year. I only realized {he} forgot when I mentioned it at dinner."),
            tldr=("{p} forgot my birthday", "{p} completely forgot my bday", "{p} didn't even remember my birthday")),
    Concept("phone_snooping", ("phone",),
            post=("A few days ago I caught {p} going through my phone while I was in the shower.",
                  "I found out {p} has been secretly going through my phone for months."),
            tldr=("{p} went through my phone", "{p} has been secretly checking my phone",
                  "{p} snooped through my phone")),
    Concept("gaming", ("video games", "gaming", "playstation", "xbox"),
            post=("{p} spends basically every evening gaming. {he} plays video games until 3am most nights.",
                  "Ever since {he} got a new Playstation, {p} is gaming every single free minute."),
            tldr=("{p} spends every free minute gaming", "{p} plays video games all night",
                  "{p} is glued to {his} Xbox")),
    Concept("relocate", ("move across the country", "moving across the country", "relocate", "relocating"),
            post=("Out of nowhere {p} told me {he} wants to move across the country for a job offer.",
                  "{p} got an offer far away and now {he} wants us to relocate in two months."),
            tldr=("{p} wants to move across the country", "{p} wants us to relocate for a job offer")),
    Concept("flirting", ("flirting", "flirts", "flirted", "flirty"),
            post=("I noticed {p} has been flirting with someone from {his} gym. "
                  "{he} sends them flirty messages late at night.",
                  "At a party last weekend I watched {p} openly flirting with a stranger for an hour."),
            tldr=("{p} keeps flirting with other people", "{p} has been openly flirting with others")),
    Concept("spent_savings", ("savings",),
            post=("{p} spent ${amount} of our joint savings on a motorcycle without asking me.",
                  "I checked our account and {p} had taken ${amount} out of our savings without telling me."),
            tldr=("{p} spent ${amount} of our savings without asking",
                  "{p} blew ${amount} of our savings behind my back"),
            amount=(1500, 9000, 100)),
    Concept("chores", ("chores", "housework", "cleaning"),
            post=("{p} never helps with chores. I do all the cooking, cleaning and laundry while {he} relaxes.",
                  "I asked {p} for the hundredth time to do some housework and {he} just rolled {his} eyes."),
            tldr=("{p} never helps with chores", "{p} refuses to do any housework")),
    Concept("solo_trip", ("trip", "vacation"),
            post=("{p} booked a trip to Vegas with {his} buddies for our anniversary weekend without even asking me.",
                  "I just found out {p} planned a vacation for our anniversary, just not with me."),
            tldr=("{p} booked a Vegas trip without me on our anniversary", "{p} planned a vacation without me")),
    Concept("no_marriage", ("marry", "married", "marriage", "propose", "proposal"),
            post=("Last night {p} told me {he} never wants to get married. Not now, not ever.",
                  "We had always talked about the future, but now {p} says {he} doesn't believe in marriage."),
            tldr=("{p} says {he} never wants to get married", "{p} told me {he} doesn't want marriage"),
            persons=("boyfriend", "girlfriend")),
    # family and friends
    Concept("unpaid_loan", ("pay me back", "paid me back", "pay it back", "paid it back", "owes me", "lent"),
            post=("Six months ago I lent {p} ${amount} for rent. {he} promised to pay me back within a month.",
                  "{p} borrowed ${amount} from me last spring and still owes me every cent."),
            tldr=("{p} borrowed ${amount} and never paid me back", "{p} still owes me ${amount}"),
            amount=(200, 3000, 50)),
    Concept("read_diary", ("diary", "journal"),
            post=("I came home early and found {p} reading my diary on the couch.",
                  "I found out {p} has been reading my journal, the one I keep in my nightstand."),
            tldr=("{p} read my diary", "{p} went through my journal")),
    Concept("skipped_graduation", ("graduation",),
            post=("{p} skipped my college graduation to go to a concert.",
                  "My graduation was last Saturday and {p} just didn't show up. {he} went to a concert instead."),
            tldr=("{p} skipped my graduation for a concert", "{p} bailed on my graduation")),
    Concept("told_secret", ("secret", "secrets"),
            post=("I told {p} a secret about my health in confidence, and {he} told half our friends.",
                  "{p} spilled a secret I had trusted {him} with to basically everyone we know."),
            tldr=("{p} told everyone a secret I trusted {him} with", "{p} spilled my secret")),
    Concept("not_invited", ("wedding",),
            post=("{p} is having {his} wedding next spring and I just found out I'm not invited.",
                  "Everyone got an invitation to {p}'s wedding except me."),
            tldr=("{p} didn't invite me to {his} wedding", "I'm not invited to {p}'s wedding")),
    Concept("eats_food", ("food", "groceries", "leftovers"),
            post=("{p} keeps eating my food. I label my groceries and {he} eats them anyway.",
                  "For weeks my leftovers have been disappearing and I finally caught {p} eating them."),
            tldr=("{p} keeps eating my food", "{p} keeps stealing my groceries"),
            persons=("roommate", "brother", "sister")),
    Concept("gave_away_cat", ("cat", "kitten"),
            post=("While I was out of town, {p} gave my cat away to a stranger from an online ad.",
                  "I came back from a week away and my cat was gone. {p} had given her away."),
            tldr=("{p} gave away my cat while I was away", "{p} rehomed my cat without asking")),
    # work
    Concept("took_credit", ("took credit", "takes credit", "taking credit", "credit for"),
            post=("Last month I put together a big client presentation and {p} took credit for it in front of "
                  "the whole team.",
                  "{p} keeps taking credit for my work in every team meeting."),
            tldr=("{p} took credit for my work", "{p} keeps taking credit for my work")),
    Concept("time_off", ("time off", "day off", "days off", "pto"),
            post=("I requested time off three months in advance for a family event and {p} rejected it last minute.",
                  "{p} cancelled my approved PTO two days before my flight."),
            tldr=("{p} cancelled my time off last minute", "{p} rejected my PTO at the last minute")),
    Concept("yelled", ("yelled", "yelling", "screamed", "screaming", "shouted", "shouting"),
            post=("Yesterday {p} yelled at me in front of customers over a tiny mistake.",
                  "{p} screamed at me in the break room because a report was one day late."),
            tldr=("{p} yelled at me over something minor", "{p} screamed at me over a small mistake")),
    Concept("unpaid_overtime", ("overtime",),
            post=("{p} keeps asking me to stay late and work overtime, but I never get paid for those hours.",
                  "For three months {p} has had me working overtime that never shows up on my pay."),
            tldr=("{p} makes me work unpaid overtime", "{p} keeps pushing unpaid overtime on me")),
    Concept("micromanaging", ("micromanages", "micromanaging", "micromanage", "micromanager", "micromanaged"),
            post=("{p} micromanages everything I do, down to how I word my emails.",
                  "Since {he} started, {p} has been micromanaging every single task I touch."),
            tldr=("{p} micromanages everything I do", "{p} is constantly micromanaging me")),
    Concept("night_shift", ("night shift", "night shifts", "graveyard shift"),
            post=("Without asking me, {p} moved me to the night shift starting next week.",
                  "{p} put me on the graveyard shift even though I told {him} I can't do nights."),
            tldr=("{p} moved me to the night shift without asking", "{p} stuck me on the graveyard shift")),
    # tifu (the narrator is the one who messed up)
    Concept("rant_text", ("text", "texted", "texting"),
            post=("I was complaining about {p} to my friend over text and accidentally sent the whole rant to "
                  "{p} instead.",),
            tldr=("I accidentally texted {p} a rant about {him}", "I sent a text complaining about {p} to {p}"),
            title=("texting the wrong person", "sending a text to the worst possible person")),
    Concept("locked_out", ("locked out", "locked myself out"),
            post=("I stepped outside in just a towel to grab a package and the door shut behind me. "
                  "I was locked out for an hour until {p} came home.",),
            tldr=("I locked myself out in a towel until {p} came home", "I got locked out in a towel and {p} found me"),
            title=("stepping outside in a towel", "grabbing a package")),
    Concept("fire_alarm", ("fire alarm", "smoke alarm", "smoke detector"),
            post=("I tried to cook bacon at {p}'s place and set off the fire alarm for the whole building.",),
            tldr=("I set off the fire alarm cooking at {p}'s place", "I set off the smoke alarm at {p}'s place"),
            title=("cooking bacon", "trying to make breakfast")),
    Concept("reply_all", ("reply all", "reply-all", "replied all", "replied to all"),
            post=("I wrote a sarcastic email about {p} and hit reply all instead of forwarding it to one person.",),
            tldr=("I hit reply all on a sarcastic email about {p}", "I replied all with a snarky email about {p}"),
            title=("not checking who I was emailing", "being sarcastic in an email"),
            persons=("boss", "coworker")),
    Concept("wrong_name", ("wrong name",),
            post=("In the middle of a serious conversation I called {p} by the wrong name. "
                  "Not just any name, my cousin's.",),
            tldr=("I called {p} by the wrong name", "I used the wrong name for {p} mid conversation"),
            title=("mixing up names", "not thinking before speaking")),
    Concept("split_pants", ("pants", "trousers"),
            post=("I bent down to pick up a pen in a meeting with {p} and split my pants right down the middle.",),
            tldr=("I split my pants in front of {p}", "I ripped my pants right in front of {p}"),
            title=("bending over", "wearing old clothes to an important meeting")),
    Concept("shrank_sweater", ("sweater", "jumper"),
            post=("I offered to help with laundry and shrank {p}'s favorite wool sweater in the dryer.",),
            tldr=("I shrank {p}'s favorite sweater", "I ruined {p}'s favorite sweater in the dryer"),
            title=("offering to help with laundry", "trying to be helpful")),
    Concept("ate_edibles", ("edibles", "edible", "gummies", "gummy"),
            post=("I ate a handful of gummies from {p}'s kitchen, not knowing they were edibles.",),
            tldr=("I ate {p}'s edibles thinking they were normal gummies", "I accidentally ate {p}'s edibles"),
            title=("snacking without asking", "eating candy that wasn't mine")),
    # personal finance
    Concept("cc_debt", ("credit card debt", "credit card", "cc debt"),
            post=("{p} and I have about ${amount} in credit card debt spread over three cards.",),
            tldr=("{p} and I have ${amount} in credit card debt", "{p} and I owe ${amount} on credit cards"),
            amount=(3000, 30000, 500)),
    Concept("student_loans", ("student loans", "student loan", "student debt"),
            post=("{p} and I finished school with ${amount} in student loans between us.",),
            tldr=("{p} and I have ${amount} in student loans", "{p} and I are sitting on ${amount} of student debt"),
            amount=(15000, 90000, 1000)),
    Concept("inheritance", ("inherited", "inheritance", "inherit"),
            post=("{p}'s grandmother passed away recently and {he} inherited ${amount}.",),
            tldr=("{p} just inherited ${amount}", "{p} got a ${amount} inheritance"),
            amount=(10000, 150000, 5000)),
    Concept("new_job", ("new job", "raise", "salary", "pay bump"),
            post=("{p} just started a new job with a salary of ${amount}, almost double the old one.",),
            tldr=("{p} just got a new job making ${amount}", "{p} got a big raise to ${amount}"),
            amount=(45000, 130000, 1000)),
    Concept("car_loan", ("car loan", "car payment", "auto loan"),
            post=("{p} and I are paying off a ${amount} car loan on a car we probably shouldn't have bought.",),
            tldr=("{p} and I are stuck with a ${amount} car loan", "{p} and I still owe ${amount} on a car loan"),
            amount=(8000, 35000, 500)),
    # legal
    Concept("kept_deposit", ("security deposit", "deposit"),
            post=("{p} is keeping my entire ${amount} security deposit for what {he} calls damages.",),
            tldr=("{p} kept my whole security deposit", "{p} won't return my ${amount} deposit"),
            amount=(600, 3500, 50)),
    Concept("final_paycheck", ("paycheck", "pay check", "wages"),
            post=("I left my job two weeks ago and {p} still hasn't paid my final paycheck.",),
            tldr=("{p} won't pay my final paycheck", "{p} is holding back my last paycheck"),
            persons=("boss",)),
    Concept("fallen_tree", ("tree",),
            post=("A dead tree from {p}'s yard fell on my car during the storm last week.",),
            tldr=("{p}'s dead tree fell on my car", "a tree from {p}'s yard crushed my car"),
            persons=("neighbor", "landlord")),
    Concept("towed_car", ("towed", "tow", "towing"),
            post=("{p} had my car towed from my own assigned parking spot.",),
            tldr=("{p} had my car towed from my own spot", "{p} got my car towed for no reason")),
    Concept("entry_without_notice", ("without notice",),
            post=("{p} keeps coming into my apartment without notice, sometimes while I'm asleep.",),
            tldr=("{p} keeps entering my apartment without notice", "{p} walks into my place without notice"),
            persons=("landlord", "roommate")),
)

COMPLICATIONS = (
    Concept("overreacting", ("overreacting", "overreact", "too sensitive", "dramatic"),
            post=("When I brought it up, {he} told me I'm overreacting and being dramatic.",
                  "{he} keeps saying I'm too sensitive and need to get over it."),
            tldr=("now {he} says I'm overreacting", "{he} says I'm being too sensitive",
                  "{he} calls me dramatic for being upset")),
    Concept("no_apology", ("apologize", "apologise", "apologized", "apology"),
            post=("{he} still hasn't apologized. When I asked {him} about it {he} just shrugged.",
                  "I've been waiting for an apology for a week and nothing."),
            tldr=("{he} refuses to apologize", "{he} won't even apologize")),
    Concept("repeat_offense", ("third time", "3rd time", "keeps happening", "not the first time"),
            post=("Honestly it's not the first time. Stuff like this keeps happening.",
                  "And this keeps happening. It's not the first time and I doubt it will be the last."),
            tldr=("it keeps happening", "it's not the first time", "this keeps happening")),
    Concept("taking_sides", ("sided with", "siding with", "side with", "his side", "her side"),
            post=("Even {his} parents sided with {him} when I told them what happened.",
                  "Everyone around us seems to be taking {his} side, which makes me feel crazy."),
            tldr=("everyone is taking {his} side", "people keep siding with {him}")),
    Concept("shared_lease", ("lease", "live together", "living together", "moved in together"),
            post=("To make things more complicated, we live together and both our names are on the lease.",
                  "We moved in together in March and the lease runs for another ten months."),
            tldr=("we live together and share a lease", "we're stuck on a lease together")),
    Concept("denial", ("denies", "denied", "deny", "denying"),
            post=("When I asked {him} about it, {he} denied everything.",
                  "{he} flat out denies it, even though I know what I saw."),
            tldr=("{he} denies everything", "{he} denied it all")),
    Concept("holidays", ("holidays", "holiday season"),
            post=("The holidays are in three weeks and we're all supposed to be together.",
                  "The holidays are coming up and the whole family will be at my place."),
            tldr=("the holidays are coming up", "we're all together for the holidays soon")),
    Concept("promotion", ("promotion", "promoted"),
            post=("The timing is awful because I'm supposed to be up for a promotion in a few months.",),
            tldr=("I'm up for a promotion soon", "I'm hoping to get promoted this year")),
    Concept("hr_did_nothing", ("hr", "human resources"),
            post=("I already went to HR about it and nothing happened.",
                  "Human resources said they would look into it, and that was a month ago."),
            tldr=("HR did nothing", "human resources ignored my complaint")),
    Concept("cant_afford", ("afford",),
            post=("I honestly can't afford to lose this job right now.",),
            tldr=("I can't afford to lose this job", "I can't afford to be unemployed")),
    Concept("silent_treatment", ("won't talk to me", "not talking to me", "silent treatment", "ignoring me"),
            post=("{he} hasn't said a word to me since. Full silent treatment.",
                  "Now {he} is ignoring me completely."),
            tldr=("now {he} won't talk to me", "now I'm getting the silent treatment")),
    Concept("whole_office", ("whole office", "entire office"),
            post=("By lunch the whole office knew about it.",),
            tldr=("now the whole office knows", "the entire office heard about it")),
    Concept("filmed", ("filmed", "on camera", "recorded"),
            post=("Of course someone filmed the whole thing.",),
            tldr=("someone filmed the whole thing", "it was all caught on camera")),
    Concept("group_chat", ("group chat",),
            post=("Somehow the story ended up in the family group chat within the hour.",),
            tldr=("it ended up in the family group chat", "now the group chat won't let it go")),
    Concept("buy_house", ("buy a house", "buying a house", "down payment", "mortgage"),
            post=("{he} really wants us to buy a house in the next two years.",),
            tldr=("{he} wants to buy a house soon", "we want a down payment for a house")),
    Concept("emergency_fund", ("emergency fund",),
            post=("We have basically no emergency fund right now.",),
            tldr=("we have no emergency fund", "our emergency fund is empty")),
    Concept("hours_cut", ("hours cut", "hours got cut", "cut my hours", "fewer hours"),
            post=("Last week my hours got cut by a third.",),
            tldr=("my hours got cut", "I'm working fewer hours now")),
    Concept("baby", ("baby", "pregnant"),
            post=("We're also having a baby in the spring.",),
            tldr=("we have a baby on the way", "we're having a baby")),
    Concept("cosigner", ("co-sign", "cosign", "co-signer", "cosigner"),
            post=("{his} parents offered to co-sign if we take on more debt.",),
            tldr=("{his} parents offered to co-sign", "we could get a cosigner")),
    Concept("nothing_in_writing", ("nothing in writing", "verbal agreement", "no contract", "no written"),
            post=("The problem is we never signed anything. It was all a verbal agreement.",),
            tldr=("there's nothing in writing", "it was only a verbal agreement")),
    Concept("threatening_to_sue", ("sue", "sued", "suing", "lawsuit"),
            post=("Now {he} is threatening to sue me.",),
            tldr=("now {he} is threatening to sue me", "{he} says {he} will sue me")),
    Concept("have_photos", ("photos", "photo", "pictures", "picture"),
            post=("I have dated photos of everything from before and after.",),
            tldr=("I have photos of everything", "I have dated pictures as proof")),
    Concept("stopped_answering", ("stopped answering", "not answering", "ghosted", "won't answer"),
            post=("{he} has stopped answering my calls and emails.",),
            tldr=("{he} stopped answering my calls", "{he} ghosted me")),
)

ASKS = (
    Concept("break_up",
            ("break up", "breaking up", "breakup", "broke up", "dump", "end things", "end the relationship"),
            post=("I'm seriously thinking about breaking up with {him}. Is that crazy?",
                  "Part of me wants to end things. Should I?"),
            tldr=("Should I break up with {him}?", "Should I dump {him}?", "Is it time to end things?"),
            persons=("boyfriend", "girlfriend", "husband", "wife")),
    Concept("aita", ("aita", "am i wrong", "in the wrong", "am i the asshole", "wrong here"),
            post=("Am I wrong for being this upset?", "So, am I the asshole here?"),
            tldr=("AITA for being upset?", "Am I wrong for being upset?", "Am I in the wrong here?")),
    Concept("bring_it_up", ("bring it up", "bring this up", "talk to him", "talk to her", "confront"),
            post=("How do I bring this up without starting a huge fight?",
                  "I want to talk to {him} about it but I don't know how to start."),
            tldr=("How do I bring it up with {him}?", "How should I confront {him}?",
                  "How do I talk to {him} about it?")),
    Concept("therapy", ("therapy", "counseling", "counselling", "therapist"),
            post=("Would therapy even help at this point, or is it a lost cause?",),
            tldr=("Should we try therapy?", "Is counseling worth a shot?"),
            persons=("boyfriend", "girlfriend", "husband", "wife", "mom", "dad", "sister", "brother")),
    Concept("cut_off", ("cut him off", "cut her off", "cut ties", "no contact", "cut off"),
            post=("I'm starting to think I should just cut {him} off. Would that be too much?",),
            tldr=("Should I cut {him} off?", "Should I cut ties with {him}?")),
    Concept("quit", ("quit", "quitting", "resign", "resigning"),
            post=("Should I just quit? I've been job hunting on the side anyway.",),
            tldr=("Should I just quit?", "Is it time to resign?")),
    Concept("stand_up", ("push back", "stand up for myself"),
            post=("How do I stand up for myself without getting fired?",),
            tldr=("How do I push back without getting fired?", "How do I stand up for myself?")),
    Concept("make_amends", ("make it up", "make this up", "make it right", "make this right", "make up for"),
            post=("How do I make this up to {him}?", "Is there any way to make this right?"),
            tldr=("How do I make it up to {him}?", "How do I make this right?")),
    Concept("show_face", ("show my face",),
            post=("I honestly don't know how I'm going to show my face around {him} again.",),
            tldr=("How do I show my face again?", "Can I ever show my face around {him} again?")),
    Concept("new_identity", ("new identity", "change my name"),
            post=("Is it too late to move away and get a new identity?",),
            tldr=("Do I need a new identity?", "Time to change my name and move?")),
    Concept("invest", ("invest", "investing", "index fund"),
            post=("Should we pay this down first or start investing?",),
            tldr=("Should we start investing?", "Pay it down or invest?")),
    Concept("roth_ira", ("roth", "ira"),
            post=("Does it make sense to open a Roth IRA now?",),
            tldr=("Should we open a Roth IRA?", "Is a Roth IRA the right move?")),
    Concept("budget", ("budget", "budgeting"),
            post=("How do we even make a budget with all this going on?",),
            tldr=("How should we budget?", "How do we make a budget that works?")),
    Concept("refinance", ("refinance", "refinancing", "refi"),
            post=("Is refinancing worth it in our situation?",),
            tldr=("Should we refinance?", "Is refinancing worth it?")),
    Concept("small_claims", ("small claims",),
            post=("Can I take {him} to small claims court over this?",),
            tldr=("Can I take {him} to small claims?", "Is small claims court worth it?")),
    Concept("lawyer", ("lawyer", "attorney"),
            post=("Do I need a lawyer for this, or can I handle it myself?",),
            tldr=("Do I need a lawyer?", "Should I get an attorney?")),
    Concept("is_it_legal", ("legal", "illegal"),
            post=("Is this even legal?",),
            tldr=("Is this legal?", "Isn't this illegal?")),
    Concept("withhold_rent", ("withhold rent", "withholding rent", "stop paying rent"),
            post=("Can I withhold rent until this is sorted out?",),
            tldr=("Can I withhold rent?", "Can I stop paying rent over this?"),
            persons=("landlord",)),
)

CONCEPTS = {c.key: c for c in PERSONS + EVENTS + COMPLICATIONS + ASKS}
KIND_OF = {c.key: kind for kind, group in zip(FACT_KINDS, (PERSONS, EVENTS, COMPLICATIONS, ASKS)) for c in group}


@dataclass(frozen=True)
class Family:
    """A kind of story: which concepts it combines and how its posts and titles open."""

    persons: tuple[str, ...]
    events: tuple[str, ...]
    complications: tuple[str, ...]
    asks: tuple[str, ...]
    intros: tuple[str, ...]  # first paragraph; slots {pname}, {me}/{them} (age tags), {me_plain}/{them_plain}, ...
    context: tuple[str, ...]  # family-specific filler sentences
    vague: tuple[str, ...]  # the main clause of a summary whose event was dropped
    titles: tuple[str, ...]  # slots {event_title}, {ask_title}, {me_plain}, {state}


FAMILIES = {
    "partner": Family(
        persons=("boyfriend", "girlfriend", "husband", "wife"),
        events=("forgot_birthday", "phone_snooping", "gaming", "relocate", "flirting", "spent_savings", "chores",
                "solo_trip", "no_marriage"),
        complications=("overreacting", "no_apology", "repeat_offense", "taking_sides", "shared_lease", "denial"),
        asks=("break_up", "aita", "bring_it_up", "therapy"),
        intros=("I {me} have been with my {pname} {them} for {dur}.",
                "My {pname} {them} and I {me} have been together for {dur}.",
                "Some background: I'm {me_plain}, my {pname} is {them_plain}, and we've been together {dur}.",
                "So my {pname} {them} and I {me} have been together for {dur} and things have mostly been great."),
        context=("We met through mutual friends at a barbecue.", "Overall the relationship has been really good.",
                 "We rarely argue, which is why this threw me.", "We both work full time and our schedules are busy."),
        vague=("{p} did something that really hurt me", "{p} and I had a big falling out"),
        titles=("{event_title}", "{ask_title}", "[{me_plain}] {event_title}", "{event_title}. {ask_title}"),
    ),
    "family": Family(
        persons=("mom", "dad", "sister", "brother", "best_friend", "roommate"),
        events=("unpaid_loan", "read_diary", "skipped_graduation", "told_secret", "not_invited", "eats_food",
                "gave_away_cat"),
        complications=("overreacting", "no_apology", "repeat_offense", "taking_sides", "denial", "holidays"),
        asks=("aita", "bring_it_up", "cut_off", "therapy"),
        intros=("I {me} have always been close with my {pname} {them}.",
                "My {pname} {them} and I {me} have a pretty normal relationship, or so I thought.",
                "I {me} have known my {pname} {them} my whole life, and we've had our ups and downs."),
        context=("We talk almost every day.", "Growing up we were inseparable.",
                 "We've always had a bit of a complicated history."),
        vague=("{p} did something that really hurt me", "{p} and I had a big falling out"),
        titles=("{event_title}", "{ask_title}", "[{me_plain}] {event_title}"),
    ),
    "work": Family(
        persons=("boss", "coworker"),
        events=("took_credit", "time_off", "yelled", "unpaid_overtime", "micromanaging", "night_shift"),
        complications=("overreacting", "repeat_offense", "promotion", "hr_did_nothing", "cant_afford"),
        asks=("aita", "bring_it_up", "quit", "stand_up"),
        intros=("I {me} have been at my current company for {dur}. My {pname} {them} has been there longer.",
                "I {me} work at a mid-sized logistics company and have for about {dur}.",
                "Some context: I'm {me_plain} and I've worked with my {pname} {them} for {dur}."),
        context=("The pay is decent and I like most of the people.", "It's a small team, maybe twelve people.",
                 "I've always gotten good reviews."),
        vague=("{p} did something really unprofessional", "{p} and I had a bad falling out"),
        titles=("{event_title}", "{ask_title}", "[{me_plain}] {event_title}"),
    ),
    "tifu": Family(
        persons=("boss", "mom", "dad", "roommate", "girlfriend", "boyfriend", "coworker", "sister"),
        events=("rant_text", "locked_out", "fire_alarm", "reply_all", "wrong_name", "split_pants", "shrank_sweater",
                "ate_edibles"),
        complications=("silent_treatment", "whole_office", "filmed", "group_chat"),
        asks=("make_amends", "show_face", "new_identity"),
        intros=("Obligatory this happened yesterday, not today.", "So this happened last night.",
                "This actually happened a few hours ago and I'm still cringing."),
        context=("For some background, I'm {me_plain} and not the most graceful person.", "I'm usually pretty careful.",
                 "In my defense, I was running on about three hours of sleep."),
        vague=("I embarrassed myself in front of {p}", "I did something dumb around {p}"),
        titles=("TIFU by {event_title}",),
    ),
    "money": Family(
        persons=("husband", "wife", "boyfriend", "girlfriend"),
        events=("cc_debt", "student_loans", "inheritance", "new_job", "car_loan"),
        complications=("buy_house", "emergency_fund", "hours_cut", "baby", "cosigner"),
        asks=("invest", "roth_ira", "budget", "refinance"),
        intros=("Long time lurker. I'm {me_plain}, living with my {pname} {them} in a medium cost of living area.",
                "I'm {me_plain} and my {pname} is {them_plain}. We're trying to get our finances in order.",
                "Throwaway for obvious reasons. My {pname} {them} and I {me} are trying to plan ahead."),
        context=("We both track spending in a spreadsheet.", "Our rent is about a third of our take-home pay.",
                 "Neither of us grew up learning much about personal finance."),
        vague=("{p} and I are trying to sort out our finances", "{p} and I had a big change in our finances"),
        titles=("{ask_title}", "{event_title}", "[{me_plain}] {event_title}. {ask_title}"),
    ),
    "legal": Family(
        persons=("landlord", "neighbor", "boss", "roommate"),
        events=("kept_deposit", "final_paycheck", "fallen_tree", "towed_car", "entry_without_notice"),
        complications=("nothing_in_writing", "threatening_to_sue", "have_photos", "stopped_answering"),
        asks=("small_claims", "lawyer", "is_it_legal", "withhold_rent"),
        intros=("Location: {state}.", "I live in {state}.", "This is in {state}, if that matters."),
        context=("I have always been on time with everything I owe.", "I tried to handle this politely at first.",
                 "I'm not trying to make a huge deal, I just want what's fair."),
        vague=("I'm in a dispute with {p}", "{p} did something I think is shady"),
        titles=("[{state}] {event_title}", "{event_title}. {ask_title}", "{ask_title}"),
    ),
}

# Subreddit -> (story families, share of the corpus); shares follow the skew of the real TL;DR data.
SUBREDDITS = {
    "relationships": (("partner", "family"), 0.30),
    "relationship_advice": (("partner", "family"), 0.14),
    "dating_advice": (("partner",), 0.05),
    "AskReddit": (("family", "work"), 0.09),
    "Advice": (("family", "work"), 0.09),
    "tifu": (("tifu",), 0.11),
    "personalfinance": (("money",), 0.11),
    "legaladvice": (("legal",), 0.11),
}

STATES = ("CA", "TX", "NY", "FL", "WA", "Ontario", "OH", "IL", "GA", "MA")
DURATIONS = ("two years", "3 years", "about 8 months", "almost five years", "a little over a year", "six years")
AGE_TAGS = ("({a}{g})", "({g}{a})", "[{a}{g}]", "({a}/{g})")

# Irrelevant details: they never mention a concept of the vocabulary.
FILLERS = (
    "Sorry for the formatting, I'm on mobile.",
    "Throwaway because people I know follow my main account.",
    "English is not my first language, so sorry for any mistakes.",
    "Long time lurker, first time posting.",
    "I'll try to keep this short.",
    "For context, I work long shifts at a hospital.",
    "We have a dog named Biscuit who is honestly the best part of my day.",
    "It has been raining here for a week straight, which doesn't help my mood.",
    "I'm usually a pretty laid back person.",
    "I've been going to the gym more lately and feel great.",
    "I also just started learning to play the guitar.",
    "My car has been making a weird noise, but that's another story.",
    "Last weekend I finally finished repainting the living room.",
    "I grew up in a small town where everyone knows everyone.",
    "I'm a pretty introverted person and I hate conflict.",
    "I've been sleeping badly for weeks because of all this.",
    "Side note, my favorite show just got cancelled, so it has been a rough month.",
    "We both like hiking and try to go somewhere new every month.",
    "I had a cold last week, so I was already cranky.",
    "I know this sounds petty, but hear me out.",
    "I know how this probably sounds.",
    "I've read a lot of posts here and never thought I'd be writing one.",
    "My friends say I should just let it go, but I can't stop thinking about it.",
    "I don't usually post things like this.",
    "I work from home most days, so I'm around the apartment a lot.",
    "I've been trying to eat healthier and cook more.",
    "We spent a weekend at the lake a couple of weeks ago and it was lovely.",
    "The heater in our building has been broken for days, which is a whole other story.",
    "I'm in my last year of school and pretty stressed in general.",
    "I also volunteer at an animal shelter on Saturdays.",
    "Honestly I'm not even sure this is the right place to post this.",
    "Please be nice, I already feel pretty bad.",
    "My sleep schedule has been a mess since the clocks changed.",
    "I drink way too much coffee, which isn't helping my nerves.",
    "We ordered pizza that night, which I only mention because it was really good pizza.",
    "I've been binge watching a baking show to distract myself.",
    "My cousin is visiting next month and I've been busy getting ready.",
    "I had just gotten home after a twelve hour shift.",
    "I'm the kind of person who overthinks everything.",
    "I've been journaling less than I should.",
    "Our town just opened a new library and I've been going there a lot.",
    "I've lived in this city for about four years now.",
    "My commute is almost an hour each way.",
    "I'm trying to save up for a used bike.",
    "I read somewhere that writing things down helps, so here I am.",
    "The weather has been weirdly warm for this time of year.",
    "I'm terrible at keeping plants alive, for the record.",
    "I've never been great at saying what I feel in the moment.",
    "I've been learning Spanish on an app for a few months.",
    "Not that it matters, but it was a Tuesday.",
    "I'll answer questions in the comments if I can.",
    "This is going to sound dumb to some of you.",
    "I've rewritten this post three times now.",
)
REACTIONS = (
    "I was honestly shocked.", "I didn't know what to say.", "It really stung, not going to lie.",
    "I tried to laugh it off.", "I keep replaying it in my head.", "It's been bugging me for days.",
    "I'm still kind of stunned.", "My heart sank.", "I just stood there.", "I did not handle it well.",
    "I'm trying not to make a big deal out of it.", "I was too surprised to react.",
)
CLOSERS = (
    "Any advice would be appreciated.", "Thanks in advance.", "Thanks for reading.", "I'd appreciate any perspective.",
    "What would you do?", "Any thoughts?", "Please help.", "Sorry this got long.",
)
EDIT_OPENERS = ("EDIT: some more context since a few people asked.", "Edit: adding some background from the comments.",
                "UPDATE: a few people asked for more details, so here goes.")
INVENTED_PERSON_CLAUSES = ("my {name} is involved too", "my {name} agrees with me", "my {name} found out as well")


# ---------------------------------------------------------------------------------------------------------------
# Concept matching
# ---------------------------------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    """Lowercase, straight apostrophes, single spaces: the text that concept forms are matched against."""
    return re.sub(r"\s+", " ", text.replace("\u2019", "'").lower())


def _concept_pattern(forms: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?:s|es|'s)?(?![a-z0-9])")


CONCEPT_PATTERNS = {key: _concept_pattern(concept.forms) for key, concept in CONCEPTS.items()}


def concepts_in(text: str) -> frozenset[str]:
    """Keys of the vocabulary concepts that `text` mentions through any of their accepted surface forms."""
    normalized = _normalize(text)
    return frozenset(key for key, pattern in CONCEPT_PATTERNS.items()  # plain substring test first: it is faster
                     if any(form in normalized for form in CONCEPTS[key].forms) and pattern.search(normalized))


# ---------------------------------------------------------------------------------------------------------------
# Latent stories and posts
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Story:
    """The latent facts behind one post; a pure function of (story_id, subreddit), see `sample_story`."""

    story_id: str
    subreddit: str
    family: str
    person: str
    event: str
    complication: str
    ask: str
    narrator_age: int
    narrator_gender: str
    person_age: int
    person_gender: str
    amount: int

    @property
    def facts(self) -> tuple[str, ...]:
        """The key facts a summary should cover, in FACT_KINDS order."""
        return (self.person, self.event, self.complication, self.ask)


def _fits(concept_key: str, person: str) -> bool:
    allowed = CONCEPTS[concept_key].persons
    return not allowed or person in allowed


def sample_story(story_id: str, subreddit: str) -> Story:
    """Draw the latent story of a post from its id and subreddit (deterministic: seeded by both)."""
    if subreddit not in SUBREDDITS:
        raise ValueError(f"unknown subreddit {subreddit!r}; known: {', '.join(SUBREDDITS)}")
    rng = random.Random(f"tldr_synth story {story_id} {subreddit}")
    family_name = rng.choice(SUBREDDITS[subreddit][0])
    family = FAMILIES[family_name]
    person = rng.choice(family.persons)
    event = rng.choice([key for key in family.events if _fits(key, person)])
    complication = rng.choice([key for key in family.complications if _fits(key, person)])
    ask = rng.choice([key for key in family.asks if _fits(key, person)])
    person_gender = CONCEPTS[person].gender or rng.choice("MF")
    if family_name == "partner" and rng.random() < 0.85:
        narrator_gender = "F" if person_gender == "M" else "M"
    else:
        narrator_gender = rng.choice("MF")
    narrator_age = rng.randint(19, 42)
    if person in ("mom", "dad"):
        person_age = narrator_age + rng.randint(20, 34)
    elif family_name in ("partner", "money") or person in ("sister", "brother", "best_friend", "roommate"):
        person_age = max(18, narrator_age + rng.randint(-5, 5))
    else:
        person_age = rng.randint(24, 63)
    low, high, step = CONCEPTS[event].amount
    amount = rng.randrange(low, high + 1, step) if high else 0
    return Story(story_id, subreddit, family_name, person, event, complication, ask,
                 narrator_age, narrator_gender, person_age, person_gender, amount)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    """Lowercase the first letter unless the first word is "I" or an acronym (e.g. "HR")."""
    first = text.split(" ", 1)[0]
    return text if first == "I" or first.isupper() else text[:1].lower() + text[1:]


def _slots(story: Story, name: str, amount_style: str = ",") -> dict[str, str]:
    """Template slots for one person name; pronouns follow the person's gender."""
    he, him, his = ("he", "him", "his") if story.person_gender == "M" else ("she", "her", "her")
    return {"p": f"my {name}", "he": he, "him": him, "his": his, "amount": format(story.amount, amount_style)}


def _fill(template: str, slots: dict[str, str], capitalize: bool = True) -> str:
    """Fill a template; with `capitalize`, every sentence of the result starts with a capital letter."""
    text = template.format_map(slots)
    return re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text) if capitalize else text


def render_post(story: Story) -> tuple[str, str]:
    """Render (title, post) for a story: intro, event, complication and question, with filler around them.

    Paragraphs are separated by "\\n" or "\\n\\n" (one choice per post). BACKSTORY_RATE of the posts carry a
    backstory (before the event) or edits (after the question) of 8-36 sentences; the longest pass 512 tokens.
    """
    rng = random.Random(f"tldr_synth post {story.story_id} {story.subreddit}")
    family = FAMILIES[story.family]
    person = CONCEPTS[story.person]
    tag = rng.choice(AGE_TAGS)
    slots = _slots(story, rng.choice(person.post))
    me_plain, them_plain = f"{story.narrator_age}{story.narrator_gender}", f"{story.person_age}{story.person_gender}"
    slots.update(pname=slots["p"].removeprefix("my "), state=rng.choice(STATES), dur=rng.choice(DURATIONS),
                 me_plain=me_plain, them_plain=them_plain,
                 me=tag.format(a=story.narrator_age, g=story.narrator_gender),
                 them=tag.format(a=story.person_age, g=story.person_gender))
    fillers = rng.sample(FILLERS, len(FILLERS))  # without replacement, so no sentence appears twice

    intro = [_fill(rng.choice(family.intros), slots)]
    if rng.random() < 0.5:
        intro.append(_fill(rng.choice(family.context), slots))
    if rng.random() < 0.3:
        intro.insert(0, fillers.pop())
    event = [_fill(rng.choice(CONCEPTS[story.event].post), slots)]
    event += rng.sample(REACTIONS, rng.randint(0, 2))
    complication = [_fill(rng.choice(CONCEPTS[story.complication].post), slots)]
    ask = [_fill(rng.choice(CONCEPTS[story.ask].post), slots)]
    if rng.random() < 0.7:
        ask.append(rng.choice(CLOSERS))
    paragraphs = [intro, event, complication, ask]

    # Short-to-medium filler: a few asides, in their own paragraph or appended to one of the story paragraphs.
    for _ in range(rng.choice(FILLER_COUNTS)):
        if rng.random() < 0.4:
            paragraphs.insert(rng.randint(1, len(paragraphs) - 1), [fillers.pop()])
        else:
            rng.choice(paragraphs).append(fillers.pop())
    if rng.random() < BACKSTORY_RATE:
        extra, n_sentences = [], rng.randint(8, 36)
        while n_sentences > 0:
            extra.append([fillers.pop() for _ in range(min(n_sentences, rng.randint(3, 6)))])
            n_sentences -= len(extra[-1])
        if rng.random() < 0.5:
            paragraphs[1:1] = extra  # backstory between the intro and the event
        else:
            paragraphs += [[rng.choice(EDIT_OPENERS)]] + extra  # edits after the question

    separator = rng.choice(("\n", "\n\n"))
    post = separator.join(" ".join(sentences) for sentences in paragraphs)

    event_concept = CONCEPTS[story.event]
    title_slots = dict(_slots(story, slots["pname"]), me_plain=me_plain, state=slots["state"])
    title_slots["event_title"] = (rng.choice(event_concept.title) if event_concept.title
                                  else _fill(rng.choice(event_concept.tldr), title_slots))
    # The question as a title names the person instead of using a pronoun ("Should I cut my sister off?").
    title_slots["ask_title"] = _fill(rng.choice(CONCEPTS[story.ask].tldr), dict(title_slots, him=title_slots["p"]))
    title = _fill(rng.choice(family.titles), title_slots)
    return title, post


@functools.lru_cache(maxsize=1 << 14)
def _synthetic(story_id: str, subreddit: str) -> tuple[Story, str, str, frozenset[str]]:
    """(story, title, post, concepts mentioned in title or post), cached: the gold judge calls it per summary."""
    story = sample_story(story_id, subreddit)
    title, post = render_post(story)
    return story, title, post, concepts_in(title + "\n" + post)


def format_query(example: dict) -> str:
    """The query the stage scripts build from a row (SFT row, comparisons row or info dict), before truncation."""
    info = example.get("info", example)
    return QUERY_TEMPLATE.format(subreddit=info["subreddit"], title=info["title"], post=info["post"])


# ---------------------------------------------------------------------------------------------------------------
# Reference summaries and their systematic variants
# ---------------------------------------------------------------------------------------------------------------


def _compose(main: str, complication: str | None, ask: str | None, joint: str) -> str:
    """Join the main clause, the complication clause and the question into TL;DR sentences."""
    text = main
    if complication is not None:
        text += joint + (_capitalize(complication) if joint == ". " else complication)
    text += "."
    if ask is not None:
        text += " " + _capitalize(ask)
    return text


def reference_flaw(story: Story) -> str:
    """The flaw of the story's human-like reference summary, drawn from REFERENCE_FLAWS (deterministic per story)."""
    draw = random.Random(f"tldr_synth reference flaw {story.story_id} {story.subreddit}").random()
    for flaw, share in REFERENCE_FLAWS.items():
        draw -= share
        if draw < 0:
            return flaw
    return flaw


def candidate_summaries(story: Story) -> dict[str, tuple[str, str]]:
    """The complete summary, each systematic variant of it and the human-like reference: {policy: (text, note)},
    deterministic per story.

    "complete" states every key fact, concisely, written from the latent facts. The variants share its wording and
    each changes one thing:
      drop_fact    one key fact (person, event, complication or question) left out
      invent_fact  a clause about a person, event or complication of the vocabulary that the post never mentions
      filler       the reference padded with irrelevant asides until it is 8-20 words over the length budget
      truncated    cut off mid-sentence inside the complication or the question
      repetitive   the main clause repeated 3-5 times, as a sampling loop would
    "ref" is the reference summary of the SFT data and the comparisons, written the way people write TL;DRs: it has
    the flaw `reference_flaw(story)` (REFERENCE_FLAWS): none (then it is the complete summary), a missing person,
    complication or question, a vague event, or 1-2 irrelevant asides. Texts have no leading space (SFT
    convention); comparison rows add one.
    """
    rng = random.Random(f"tldr_synth summaries {story.story_id} {story.subreddit}")
    _, _, _, mentioned = _synthetic(story.story_id, story.subreddit)
    family = FAMILIES[story.family]
    slots = _slots(story, rng.choice(CONCEPTS[story.person].tldr), amount_style=rng.choice((",", "")))
    event_template = rng.choice(CONCEPTS[story.event].tldr)
    main_template = event_template
    if event_template.startswith("{p} ") and rng.random() < 0.3:  # age tag on the first mention, Reddit style
        main_template = event_template.replace("{p}", "{p} " + f"({story.person_age}{story.person_gender})", 1)
    main = _fill(main_template, slots)
    complication = _fill(rng.choice(CONCEPTS[story.complication].tldr), slots, capitalize=False)
    ask = _fill(rng.choice(CONCEPTS[story.ask].tldr), slots)
    joint = rng.choice((", and ", ". ", " and ", "; "))
    lowercase = rng.random() < 0.2  # "my bf forgot my bday and now he says i'm overreacting. should i dump him?"

    reference = _compose(main, complication, ask, joint)
    candidates = {"complete": (reference, "every key fact, written from the latent facts")}

    def without(kind: str, vague: str) -> str:
        """The complete summary without one key fact; `vague` is the main clause used when the event goes."""
        if kind == "person":
            return _compose(_fill(event_template, dict(slots, p="someone")), complication, ask, joint)
        if kind == "event":
            return _compose(_fill(vague, slots), complication, ask, joint)
        if kind == "complication":
            return _compose(main, None, ask, joint)
        return _compose(main, complication, None, joint)

    dropped = rng.choice(FACT_KINDS)
    candidates["drop_fact"] = (without(dropped, rng.choice(family.vague)), f"dropped the {dropped}")

    inventable = sorted(key for key in CONCEPTS if key not in mentioned and KIND_OF[key] != "ask")
    invented = rng.choice(inventable)
    if KIND_OF[invented] == "person":
        clause = rng.choice(INVENTED_PERSON_CLAUSES).format(name=rng.choice(CONCEPTS[invented].tldr))
    else:
        clause = _lower_first(_fill(rng.choice(CONCEPTS[invented].tldr), slots))
    candidates["invent_fact"] = (_compose(main + " and " + clause, complication, ask, joint), f"invented: {invented}")

    padding = rng.sample(FILLERS, len(FILLERS))
    padded = reference
    target = LENGTH_BUDGET_WORDS + rng.randint(8, 20)
    while len(padded.split()) < target:
        padded += " " + padding.pop()
    candidates["filler"] = (padded, "padded with irrelevant details")

    # Cut inside the complication (loses it and the question) or inside the question (loses the question).
    # Keep at most two words of the cut clause, fewer if they would already name the lost fact.
    if rng.random() < 0.5:
        kept, lost = main + joint.rstrip(), story.complication
        cut_clause = _capitalize(complication) if joint == ". " else complication
    else:
        kept, cut_clause, lost = _compose(main, complication, None, joint), ask, story.ask
    for n_words in (2, 1, 0):
        truncated = " ".join([kept] + cut_clause.split()[:n_words])
        if lost not in concepts_in(truncated):
            break
    candidates["truncated"] = (truncated, "cut off mid-sentence")

    loop = " ".join([main] + [_lower_first(main)] * rng.randint(2, 4))
    candidates["repetitive"] = (_compose(loop, complication, ask, joint), "main clause repeated")

    # The human-like reference, from its own random stream so that the candidates above do not depend on it.
    flaw, ref_rng = reference_flaw(story), random.Random(f"tldr_synth reference {story.story_id} {story.subreddit}")
    if flaw == "missing_fact":
        missing = ref_rng.choice(("person", "complication", "ask"))
        text, note = without(missing, ""), f"reference summary without the {missing}"
    elif flaw == "vague_event":
        text, note = without("event", ref_rng.choice(family.vague)), "reference summary, vague about the event"
    elif flaw == "rambling":
        asides = ref_rng.sample(FILLERS, ref_rng.randint(1, 2))
        text, note = " ".join([reference] + asides), f"reference summary with {len(asides)} irrelevant asides"
    else:
        text, note = reference, "reference summary, complete"
    candidates["ref"] = (text, note)
    return {policy: (text.lower() if lowercase else text, note) for policy, (text, note) in candidates.items()}


# ---------------------------------------------------------------------------------------------------------------
# Gold judge
# ---------------------------------------------------------------------------------------------------------------


def _example_story(example: dict) -> tuple[Story, frozenset[str]]:
    """Recover (story, concepts mentioned in the post) from an SFT row, a comparisons row or an info dict."""
    info = example.get("info", example)
    story, _, post, mentioned = _synthetic(info["id"], info["subreddit"])
    if "post" in info and info["post"] != post:
        raise ValueError(f"example {info['id']!r} is not a post of this synthetic corpus (its post text differs)")
    return story, mentioned


def repeated_trigram_fraction(text: str) -> float:
    """1 - distinct/total over the word trigrams of `text` (0 when it has fewer than three words)."""
    words = _normalize(text).split()
    trigrams = list(zip(words, words[1:], words[2:]))
    return 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def gold_breakdown(example: dict, summary: str) -> dict:
    """The terms of `gold_score` for one summary: coverage, invented concepts, length, repetition and conciseness
    penalties."""
    story, mentioned = _example_story(example)
    n_words = len(summary.split())
    if n_words == 0:
        return {"score": EMPTY_SCORE, "coverage": 0.0, "covered": [], "missing": list(story.facts), "invented": [],
                "words": 0, "hallucination_penalty": 0.0, "length_penalty": 0.0, "repetition_penalty": 0.0,
                "conciseness_penalty": 0.0}
    found = concepts_in(summary)
    covered = [key for key in story.facts if key in found]
    invented = sorted(found - mentioned)
    coverage = len(covered) / len(story.facts)
    hallucination = HALLUCINATION_PENALTY * len(invented)
    length = LENGTH_PENALTY * max(0, n_words - LENGTH_BUDGET_WORDS)
    repetition = REPETITION_PENALTY * repeated_trigram_fraction(summary)
    conciseness = CONCISENESS_PENALTY * len(summary.strip())
    return {"score": coverage - hallucination - length - repetition - conciseness, "coverage": coverage,
            "covered": covered, "missing": [key for key in story.facts if key not in found], "invented": invented,
            "words": n_words, "hallucination_penalty": hallucination, "length_penalty": length,
            "repetition_penalty": repetition, "conciseness_penalty": conciseness}


def gold_score(example: dict, summary: str) -> float:
    """Gold quality of `summary` for the post in `example` (an SFT row, a comparisons row or its `info` dict).

    The post's latent story is regenerated from the example's id and subreddit. It has four key facts: the
    person (and their relation to the narrator), the event, the complication and the question asked. Every fact
    is a vocabulary concept with a set of accepted surface forms (synonyms, abbreviations: "boyfriend"/"bf",
    "birthday"/"bday", "break up"/"dump"/"end things"), matched case-insensitively as whole words, so paraphrases
    score the same. The score is

        coverage                                  share of the 4 key facts mentioned (0, 0.25, ..., 1)
      - 0.3  * invented concepts                  vocabulary concepts (people, events, complications, questions)
                                                  mentioned in the summary but nowhere in the title or post
      - 0.02 * max(0, words - 40)                 length beyond a budget of 40 whitespace-separated words
      - 1.0  * repeated trigram fraction          1 - distinct/total word trigrams (degenerate repetition)
      - 0.001 * characters                        conciseness: of two summaries with the same facts, the shorter
                                                  wins, so gold ties are rare (a key fact is worth 250 characters)

    and an empty summary (no words) scores -1. A complete summary (every key fact, nothing invented, at most 40
    words, no repeated trigram) scores 1 minus its conciseness term, about 0.87 for a typical 130 characters.
    Filler details of the post are neither rewarded nor penalised, except for the words and characters they cost.
    """
    return gold_breakdown(example, summary)["score"]


def gold_prefers(example: dict, a: str, b: str) -> bool:
    """True if the gold judge prefers summary `a` to summary `b` (strictly higher gold score)."""
    return gold_score(example, a) > gold_score(example, b)


# ---------------------------------------------------------------------------------------------------------------
# Noise model of the labels
# ---------------------------------------------------------------------------------------------------------------


def label_probability(margin: float, temperature: float) -> float:
    """Bradley-Terry: P(the label prefers a) = sigmoid(margin / temperature), margin = gold(a) - gold(b)."""
    return 1.0 / (1.0 + math.exp(-margin / temperature))


def expected_agreement(margins: list[float], temperature: float) -> float:
    """Expected agreement of the noisy labels with the noiseless gold preference, mean of max(p, 1 - p).

    This is also the accuracy ceiling of any reward model scored against the noisy labels: no predictor can beat
    always choosing the gold winner, which is right with probability max(p, 1 - p) on each pair.
    """
    return float(np.mean([label_probability(abs(m), temperature) for m in margins]))


def calibrate_temperature(margins: list[float], target: float = TARGET_AGREEMENT) -> float:
    """The temperature whose expected agreement on these pair margins is `target` (bisection on log T)."""
    if not 0.5 < target < 1.0:
        raise ValueError(f"target agreement must be in (0.5, 1), got {target}")
    if not any(margins):
        raise ValueError("every pair has a gold margin of 0; no temperature can reach the target agreement")
    low, high = math.log(1e-4), math.log(1e4)
    for _ in range(100):  # expected agreement decreases with the temperature
        mid = (low + high) / 2
        low, high = (mid, high) if expected_agreement(margins, math.exp(mid)) > target else (low, mid)
    return math.exp((low + high) / 2)


def confidence_from_probability(p: float) -> int:
    """Labeller confidence on the 1..9 scale of the hub data: 1 at p = 0.5, 9 as max(p, 1 - p) -> 1."""
    return 1 + round(8 * (2 * max(p, 1 - p) - 1))


def label_agreement(rows: list[dict], temperature: float) -> dict:
    """Agreement of the rows' labels with the noiseless gold preference (ties count 1/2) and its expectation."""
    margins, agree = [], []
    for row in rows:
        a, b = (summary["text"] for summary in row["summaries"])
        margin = gold_score(row, a) - gold_score(row, b)
        margins.append(margin)
        agree.append(0.5 if margin == 0 else float((margin > 0) == (row["choice"] == 0)))
    return {"pairs": len(rows), "agreement": float(np.mean(agree)),
            "expected_agreement_ceiling": expected_agreement(margins, temperature),
            "gold_ties": int(sum(m == 0 for m in margins))}


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------


def _check_subreddits(subreddits: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    chosen = tuple(SUBREDDITS) if subreddits is None else tuple(subreddits)
    unknown = [name for name in chosen if name not in SUBREDDITS]
    if unknown or not chosen:
        raise ValueError(f"unknown subreddit(s) {unknown or '(empty list)'}; choose from: {', '.join(SUBREDDITS)}")
    return chosen


def _subreddit_picker(seed: int, part: str, subreddits: tuple[str, ...]) -> Callable[[], str]:
    """A deterministic sampler of subreddits, weighted by their share of the corpus."""
    rng = random.Random(f"tldr_synth subreddits {seed} {part}")
    weights = [SUBREDDITS[name][1] for name in subreddits]
    return lambda: rng.choices(subreddits, weights)[0]


def _info(story_id: str, subreddit: str) -> dict:
    _, title, post, _ = _synthetic(story_id, subreddit)
    return {"id": story_id, "post": post, "title": title, "subreddit": subreddit, "site": None, "article": None}


def make_sft_rows(seed: int, split: str, n: int, subreddits: tuple[str, ...] | None = None) -> list[dict]:
    """`n` SFT rows (id, subreddit, title, post, summary) for one split; ids are f"synth{seed}-sft_{split}-{i:06d}"."""
    pick = _subreddit_picker(seed, f"sft_{split}", _check_subreddits(subreddits))
    rows = []
    for i in range(n):
        story_id, subreddit = f"synth{seed}-sft_{split}-{i:06d}", pick()
        story, title, post, _ = _synthetic(story_id, subreddit)
        rows.append({"id": story_id, "subreddit": subreddit, "title": title, "post": post,
                     "summary": candidate_summaries(story)["ref"][0]})  # the human-like reference
    return rows


def _comparison_pair(story: Story, rng: random.Random) -> tuple[tuple[str, str, str], tuple[str, str, str], float]:
    """Two candidates of a story with different gold scores, in random order: ((policy, text, note) x 2, margin).

    REF_PAIR_RATE of the pairs put the human-like reference against the complete summary or a variant; the others
    pair two of the complete summary and the variants."""
    candidates = candidate_summaries(story)
    example = {"id": story.story_id, "subreddit": story.subreddit}
    score = {policy: gold_score(example, text) for policy, (text, _) in candidates.items()}
    others = ("complete",) + VARIANTS
    if rng.random() < REF_PAIR_RATE:
        pair = ["ref", rng.choice([p for p in others if score[p] != score["ref"]])]
    else:
        options = [(a, b) for i, a in enumerate(others) for b in others[i + 1 :] if score[a] != score[b]]
        pair = list(rng.choice(options))
    rng.shuffle(pair)
    a, b = ((policy,) + candidates[policy] for policy in pair)
    return a, b, score[pair[0]] - score[pair[1]]


def _labelled_row(info: dict, a: tuple[str, str, str], b: tuple[str, str, str], margin: float, temperature: float,
                  rng: random.Random, split: str, workers: list[str]) -> dict:
    """A comparisons row in the hub schema, its label drawn from the Bradley-Terry noise model."""
    p = label_probability(margin, temperature)
    return {
        "info": info,
        "summaries": [{"text": " " + text, "policy": policy, "note": note} for policy, text, note in (a, b)],
        "choice": 0 if rng.random() < p else 1,
        "worker": rng.choice(workers),
        "batch": f"batch{rng.randint(3, 10) if split == 'train' else rng.randint(11, 22)}",
        "split": "train" if split == "train" else rng.choice(("valid1", "valid2")),
        "extra": {"confidence": confidence_from_probability(p)},
    }


def _workers(seed: int) -> list[str]:
    rng = random.Random(f"tldr_synth workers {seed}")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return ["".join(rng.choice(alphabet) for _ in range(30)) for _ in range(N_WORKERS)]


def make_comparison_rows(seed: int, sizes: dict[str, int], subreddits: tuple[str, ...] | None = None,
                         target_agreement: float = TARGET_AGREEMENT) -> tuple[dict[str, list[dict]], float]:
    """Comparison rows per split ({"train": n, "validation": n}) and the label temperature calibrated on all pairs.

    Each row is one post (ids f"synth{seed}-cmp_{split}-{i:06d}", distinct from every SFT post) and a pair of its
    candidates: the reference against a variant (REF_PAIR_RATE of the rows) or two variants with different gold
    scores. The temperature is chosen so that the expected agreement with the gold preference is
    `target_agreement` over all pairs; labels are then drawn from label_probability(margin, temperature).
    """
    subreddits = _check_subreddits(subreddits)
    pairs = {}
    for split, n in sizes.items():
        pick = _subreddit_picker(seed, f"cmp_{split}", subreddits)
        rng = random.Random(f"tldr_synth pairs {seed} {split}")
        pairs[split] = [(story_id, subreddit) + _comparison_pair(sample_story(story_id, subreddit), rng)
                        for story_id, subreddit in ((f"synth{seed}-cmp_{split}-{i:06d}", pick()) for i in range(n))]
    temperature = calibrate_temperature([pair[-1] for split_pairs in pairs.values() for pair in split_pairs],
                                        target_agreement)
    workers, rows = _workers(seed), {}
    for split, split_pairs in pairs.items():
        rng = random.Random(f"tldr_synth labels {seed} {split}")
        rows[split] = [_labelled_row(_info(story_id, subreddit), a, b, margin, temperature, rng, split, workers)
                       for story_id, subreddit, a, b, margin in split_pairs]
    return rows, temperature


def write_jsonl(path: str, rows: list[dict]) -> None:
    """One JSON object per line, keys in insertion order, UTF-8, "\\n" line ends: byte-identical for equal rows."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate_corpus(out_dir: str, seed: int = 0, n_sft_train: int = 2000, n_sft_validation: int = 200,
                    n_sft_test: int = 200, n_cmp_train: int = 2000, n_cmp_validation: int = 400,
                    subreddits: list[str] | tuple[str, ...] | None = None, target_agreement: float = TARGET_AGREEMENT,
                    overwrite: bool = False) -> dict:
    """Write the SFT and comparison splits and meta.json under `out_dir`; return the metadata.

    Raises ValueError for a size below 1, an unknown subreddit, or an existing `out_dir` without `overwrite`
    (overwriting replaces the files this function writes and leaves other files alone).
    """
    sizes = {"n_sft_train": n_sft_train, "n_sft_validation": n_sft_validation, "n_sft_test": n_sft_test,
             "n_cmp_train": n_cmp_train, "n_cmp_validation": n_cmp_validation}
    bad = {name: n for name, n in sizes.items() if not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"sizes must be positive integers, got {bad}")
    subreddits = _check_subreddits(subreddits)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"output folder {out_dir} already exists; pass --overwrite (overwrite=True) to replace "
                         "its files")

    for split in ("train", "validation", "test"):
        write_jsonl(os.path.join(out_dir, "sft", f"{split}.jsonl"),
                    make_sft_rows(seed, split, sizes[f"n_sft_{split}"], subreddits))
    comparisons, temperature = make_comparison_rows(
        seed, {"train": n_cmp_train, "validation": n_cmp_validation}, subreddits, target_agreement)
    for split, rows in comparisons.items():
        write_jsonl(os.path.join(out_dir, "comparisons", f"{split}.jsonl"), rows)
    meta = {"seed": seed, "sizes": sizes, "subreddits": list(subreddits), "target_agreement": target_agreement,
            "label_temperature": temperature,
            "label_agreement": {split: label_agreement(rows, temperature) for split, rows in comparisons.items()}}
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Comparisons from a model's own samples
# ---------------------------------------------------------------------------------------------------------------


def read_samples(path: str) -> list[dict]:
    """Model samples from a JSONL or CSV file with columns `id`, `response` and optionally `policy`."""
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            samples = list(csv.DictReader(f))
    else:
        samples = read_jsonl(path)
    missing = [i for i, sample in enumerate(samples) if "id" not in sample or "response" not in sample]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} lack an `id` or `response` column")
    return samples


def build_model_comparisons(sft_rows: list[dict], samples: list[dict], temperature: float, seed: int = 0,
                            pairing: str = "samples", split: str = "train") -> list[dict]:
    """Comparison rows (hub schema) for a model's own samples, labelled by the same noisy gold judge.

    `samples` are dicts {id, response[, policy]} whose ids are rows of `sft_rows` (responses are stripped and get
    the hub's leading space; policy defaults to "model"). pairing="samples" pairs the distinct responses of a
    post two at a time in the given order (1st vs 2nd, 3rd vs 4th, ...); pairing="reference" pairs each response
    with the post's reference summary (policy "ref"). Pairs of identical texts are skipped. Labels follow
    label_probability(gold margin, temperature); pass the corpus' meta["label_temperature"] to keep its noise.
    """
    if pairing not in ("samples", "reference"):
        raise ValueError(f"pairing must be 'samples' or 'reference', got {pairing!r}")
    by_id = {row["id"]: row for row in sft_rows}
    responses: dict[str, list[tuple[str, str]]] = {}
    for sample in samples:
        if sample["id"] not in by_id:
            raise ValueError(f"sample id {sample['id']!r} is not a row of the SFT data")
        responses.setdefault(sample["id"], []).append((sample.get("policy") or "model", sample["response"].strip()))

    rng, workers, rows = random.Random(f"tldr_synth model comparisons {seed} {split}"), _workers(seed), []
    for story_id, candidates in responses.items():
        row = by_id[story_id]
        if pairing == "reference":
            pairs = [(("ref", row["summary"]), candidate) for candidate in candidates]
        else:
            distinct = []  # first occurrence of each text, in order
            for candidate in candidates:
                if all(candidate[1] != text for _, text in distinct):
                    distinct.append(candidate)
            pairs = list(zip(distinct[0::2], distinct[1::2]))
        info = {"id": row["id"], "post": row["post"], "title": row["title"], "subreddit": row["subreddit"],
                "site": None, "article": None}
        for first, second in pairs:
            if first[1] == second[1]:
                continue
            a, b = rng.sample([first, second], 2)
            margin = gold_score(row, a[1]) - gold_score(row, b[1])
            rows.append(_labelled_row(info, a + ("",), b + ("",), margin, temperature, rng, split, workers))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def reference_win_rates(examples: list[dict]) -> dict[str, float]:
    """For each variant, the share of examples whose complete summary has a strictly higher gold score than the
    variant (each variant is designed to lose to it)."""
    wins = {variant: 0 for variant in VARIANTS}
    for example in examples:
        story, _ = _example_story(example)
        candidates = candidate_summaries(story)
        reference = gold_score(example, candidates["complete"][0])
        for variant in VARIANTS:
            wins[variant] += reference > gold_score(example, candidates[variant][0])
    return {variant: count / len(examples) for variant, count in wins.items()}


def reference_quality(examples: list[dict]) -> dict:
    """How the human-like references of `examples` compare with the complete summaries: the share of each flaw,
    the mean gold score of both, the share of references the complete summary beats, and the gold tie rate."""
    flaws = {flaw: 0 for flaw in REFERENCE_FLAWS}
    ref_scores, complete_scores = [], []
    for example in examples:
        story, _ = _example_story(example)
        candidates = candidate_summaries(story)
        flaws[reference_flaw(story)] += 1
        ref_scores.append(gold_score(example, candidates["ref"][0]))
        complete_scores.append(gold_score(example, candidates["complete"][0]))
    n = len(examples)
    return {"flaw_shares": {flaw: count / n for flaw, count in flaws.items()},
            "mean_gold_reference": float(np.mean(ref_scores)), "mean_gold_complete": float(np.mean(complete_scores)),
            "complete_beats_reference": sum(c > r for c, r in zip(complete_scores, ref_scores)) / n,
            "complete_ties_reference": sum(c == r for c, r in zip(complete_scores, ref_scores)) / n}


def _distribution(values: list[int], limit: int) -> dict:
    values_array = np.asarray(values)
    quantiles = np.percentile(values_array, [0, 5, 25, 50, 75, 95, 100])
    return {"n": len(values), "mean": float(values_array.mean()),
            **{name: float(q) for name, q in zip(("min", "p5", "p25", "median", "p75", "p95", "max"), quantiles)},
            f"share_over_{limit}": float((values_array > limit).mean())}


def corpus_stats(out_dir: str, tokenizer_path: str, plot_path: str | None = None, json_path: str | None = None,
                 query_limit: int = 512, summary_limit: int = 48) -> dict:
    """Measure a generated corpus: reference-vs-variant win rates on the validation posts, label agreement and its
    ceiling per split, and token lengths (SmolLM2 tokenizer) of formatted queries and of summaries.

    Writes a PNG histogram to `plot_path` and the stats as JSON to `json_path` when given; returns the stats.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import AutoTokenizer

    with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    sft = {split: read_jsonl(os.path.join(out_dir, "sft", f"{split}.jsonl"))
           for split in ("train", "validation", "test")}
    comparisons = {split: read_jsonl(os.path.join(out_dir, "comparisons", f"{split}.jsonl"))
                   for split in ("train", "validation")}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    sft_rows = [row for rows in sft.values() for row in rows]
    cmp_rows = [row for rows in comparisons.values() for row in rows]
    query_lengths = lengths([format_query(row) for row in sft_rows])
    summary_lengths = lengths([" " + row["summary"] for row in sft_rows])
    texts_by_policy: dict[str, list[str]] = {}
    for row in cmp_rows:
        for summary in row["summaries"]:
            texts_by_policy.setdefault(summary["policy"], []).append(summary["text"])
    stats = {
        "sizes": meta["sizes"],
        "label_temperature": meta["label_temperature"],
        "reference_win_rate_validation": reference_win_rates(comparisons["validation"]),
        "reference_quality_sft": reference_quality(sft_rows),
        "label_agreement": {split: label_agreement(rows, meta["label_temperature"])
                            for split, rows in comparisons.items()},
        "subreddit_shares": {name: sum(row["subreddit"] == name for row in sft_rows) / len(sft_rows)
                             for name in meta["subreddits"]},
        "sft_query_tokens": _distribution(query_lengths, query_limit),
        "comparison_query_tokens": _distribution(lengths([format_query(row) for row in cmp_rows]), query_limit),
        "reference_summary_tokens": _distribution(summary_lengths, summary_limit),
        "comparison_summary_tokens": {policy: _distribution(lengths(texts), summary_limit)
                                      for policy, texts in texts_by_policy.items()},
    }
    if plot_path:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.hist(query_lengths, bins=60, color="tab:blue")
        left.axvline(query_limit, color="tab:red", linestyle="--", label=f"{query_limit} tokens")
        left.set(title="SFT queries (formatted)", xlabel="tokens", ylabel="posts")
        left.legend()
        right.hist(summary_lengths, bins=range(0, max(summary_lengths) + 2), color="tab:green")
        right.axvline(summary_limit, color="tab:red", linestyle="--", label=f"{summary_limit} tokens")
        right.set(title="Reference summaries", xlabel="tokens", ylabel="summaries")
        right.legend()
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="data/tldr_synth",
                        help="corpus folder (gets sft/, comparisons/, meta.json)")
    parser.add_argument("--seed", type=int, default=0)
    for name, default in DEFAULT_SIZES.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=f"number of rows (default {default})")
    parser.add_argument("--subreddits", default=",".join(SUBREDDITS), help="comma-separated subset of the subreddits")
    parser.add_argument("--target_agreement", type=float, default=TARGET_AGREEMENT,
                        help="agreement of the labels with the noiseless gold preference")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing output folder")
    parser.add_argument("--stats", action="store_true", help="measure the generated corpus (needs the tokenizer)")
    parser.add_argument("--tokenizer", default="models/smollm2-135m", help="tokenizer for the length statistics")
    parser.add_argument("--plot", default=None, help="histogram PNG (default <out_dir>/stats.png)")
    parser.add_argument("--samples", default=None,
                        help="JSONL/CSV of model samples (id, response[, policy]) for the SFT posts of an existing "
                             "corpus in --out_dir: write <out_dir>/model_comparisons/<samples_split>.jsonl instead "
                             "of generating a corpus")
    parser.add_argument("--samples_split", default="train", choices=("train", "validation"))
    parser.add_argument("--pairing", default="samples", choices=("samples", "reference"),
                        help="pair samples with each other or each sample with the reference")
    return parser.parse_args(argv)


def run_generation(args: argparse.Namespace) -> None:
    """Generate the corpus (and its statistics with --stats) as the command line asks."""
    start = time.perf_counter()
    sizes = {name: getattr(args, name) for name in DEFAULT_SIZES}
    subreddits = [name.strip() for name in args.subreddits.split(",") if name.strip()]
    meta = generate_corpus(args.out_dir, seed=args.seed, subreddits=subreddits, target_agreement=args.target_agreement,
                           overwrite=args.overwrite, **sizes)
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f}s; label temperature "
          f"{meta['label_temperature']:.4f}; agreement with gold: "
          + ", ".join(f"{split} {a['agreement']:.3f} (ceiling {a['expected_agreement_ceiling']:.3f})"
                      for split, a in meta["label_agreement"].items()))
    if args.stats:
        plot_path = args.plot or os.path.join(args.out_dir, "stats.png")
        stats = corpus_stats(args.out_dir, args.tokenizer, plot_path=plot_path,
                             json_path=os.path.join(args.out_dir, "stats.json"))
        print(json.dumps(stats, indent=2))


def run_sample_labelling(args: argparse.Namespace) -> None:
    """Label a model's samples for the SFT posts of an existing corpus with the corpus' noisy gold judge."""
    out_path = os.path.join(args.out_dir, "model_comparisons", f"{args.samples_split}.jsonl")
    if os.path.exists(out_path) and not args.overwrite:
        raise ValueError(f"{out_path} already exists; pass --overwrite to replace it")
    meta_path = os.path.join(args.out_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"{args.out_dir} holds no generated corpus (no meta.json); generate one first")
    with open(meta_path, encoding="utf-8") as f:
        temperature = json.load(f)["label_temperature"]
    sft_rows = [row for split in ("train", "validation", "test")
                for row in read_jsonl(os.path.join(args.out_dir, "sft", f"{split}.jsonl"))]
    rows = build_model_comparisons(sft_rows, read_samples(args.samples), temperature, seed=args.seed,
                                   pairing=args.pairing, split=args.samples_split)
    write_jsonl(out_path, rows)
    agreement = label_agreement(rows, temperature) if rows else {}
    print(f"wrote {len(rows)} comparisons to {out_path}; {json.dumps(agreement)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.samples:
            run_sample_labelling(args)
        else:
            run_generation(args)
    except ValueError as error:  # bad configuration: a clear message instead of a traceback
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
