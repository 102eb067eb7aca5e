"""Writes tickets.jsonl: synthetic customer-support questions and answers for the example.

Deterministic (seeded), standard library only. Run it from anywhere:

    python example-project/data/make_tickets.py

Besides ~220 distinct tickets over five product areas, the file holds a few rows that the
example's `prepare` steps are meant to remove, so `llmops apply` visibly changes the data:
exact duplicates and near duplicates (one word changed) for `dedupe`, and very short
questions (under 8 characters) for `filter`.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SEED = 13
PER_CATEGORY = 44
OUT = Path(__file__).with_name("tickets.jsonl")

PLANS = ["Basic", "Plus", "Pro", "Team", "Family"]
ITEMS = ["wireless speaker", "coffee grinder", "desk lamp", "backpack", "smart watch", "yoga mat",
         "phone case", "water bottle", "keyboard"]
DEVICES = ["iPhone", "Android phone", "laptop", "tablet", "work computer"]
CARRIERS = ["UPS", "FedEx", "DHL", "the postal service"]
COUNTRIES = ["Canada", "Germany", "Japan", "Brazil", "Australia"]

# category -> list of (question template, answer template, slot name -> values).
# Slots sit inside the questions, never at an edge, so two questions from one template
# differ in several word shingles and are not near duplicates of each other.
TEMPLATES: dict[str, list[tuple[str, str, dict[str, list[str]]]]] = {
    "billing": [
        ("Why was I charged twice for my {plan} plan this month?",
         "A second charge is usually a pending authorization that disappears within 3 business days.",
         {"plan": PLANS}),
        ("How do I update the card used for my {plan} subscription?",
         "Go to Settings > Billing > Payment method and choose Replace card.",
         {"plan": PLANS}),
        ("Where can I download an invoice for the {plan} plan?",
         "Open Settings > Billing > Invoices and click Download PDF.",
         {"plan": PLANS}),
        ("Can I pay for the {plan} plan with {payment} instead?",
         "Yes, {payment} works for every plan; pick it under Settings > Billing.",
         {"plan": PLANS, "payment": ["PayPal", "Apple Pay", "a bank transfer"]}),
        ("Is sales tax included in the {plan} plan price?",
         "Prices exclude tax; the tax for your address is shown at checkout.",
         {"plan": PLANS}),
        ("How do I switch from the {plan} plan to {plan2} billing?",
         "Go to Settings > Billing > Plan and choose Change billing period.",
         {"plan": PLANS, "plan2": ["yearly", "monthly"]}),
        ("Why did my {plan} plan price go up in {month} this year?",
         "Prices change once a year; we email you 30 days before a new price applies.",
         {"plan": PLANS, "month": ["January", "April", "July", "October"]}),
    ],
    "login": [
        ("I forgot my password, how do I reset it on my {device} today?",
         "Tap Forgot password on the sign-in screen and follow the link we email you.",
         {"device": DEVICES}),
        ("Why does my {device} keep logging me out every day?",
         "Turn off private browsing and allow cookies, then sign in again.",
         {"device": DEVICES}),
        ("The two-factor code never arrives on my {device}, what now?",
         "Check the phone clock is set automatically, or use one of your backup codes.",
         {"device": DEVICES}),
        ("My account is locked after failed logins on my {device}, help?",
         "Accounts unlock by themselves after 30 minutes; then reset your password.",
         {"device": DEVICES}),
        ("How do I sign in with {provider} on the {device} app?",
         "Choose Continue with {provider} on the sign-in screen of the app.",
         {"provider": ["Google", "Apple", "Microsoft"], "device": DEVICES}),
        ("Can I stay signed in on my {device} for {period} at a time?",
         "Tick Keep me signed in when you log in; sessions then last 30 days.",
         {"device": DEVICES, "period": ["a week", "a month", "30 days"]}),
    ],
    "shipping": [
        ("When will my {item} order ship from the warehouse?",
         "Orders ship within 2 business days; you get a tracking email when it leaves.",
         {"item": ITEMS}),
        ("How can I track the {item} I ordered last week?",
         "Open Orders, select the order and click Track package.",
         {"item": ITEMS}),
        ("Do you ship the {item} to {country} and how long?",
         "Yes, we ship to {country}; delivery takes 5 to 10 business days.",
         {"item": ITEMS, "country": COUNTRIES}),
        ("My {item} was marked delivered by {carrier} but never arrived.",
         "Please wait one day and check with neighbours; then reply and we will open a claim.",
         {"item": ITEMS, "carrier": CARRIERS}),
        ("Can I change the delivery address for my {item} order?",
         "Yes, until the order ships: open Orders and click Edit address.",
         {"item": ITEMS}),
    ],
    "refunds": [
        ("How do I return the {item} for a refund?",
         "Open Orders, choose Return item and print the free label.",
         {"item": ITEMS}),
        ("How long does a refund for the {item} take to appear?",
         "Refunds reach your card 5 to 7 business days after we receive the return.",
         {"item": ITEMS}),
        ("The {item} arrived broken, can I get my money back?",
         "Yes, send us a photo of the damage and we refund you without a return.",
         {"item": ITEMS}),
        ("Can I get a refund for the {plan} plan I forgot to cancel?",
         "Yes, we refund unused time if you ask within 14 days of the renewal.",
         {"plan": PLANS}),
        ("Is there a restocking fee when I return the {item} opened?",
         "No, returns are free within 30 days even when the box was opened.",
         {"item": ITEMS}),
        ("Can I exchange the {item} for a different {variant} instead?",
         "Yes, choose Exchange item in Orders and pick the new {variant}; shipping is free.",
         {"item": ITEMS, "variant": ["color", "size", "model"]}),
    ],
    "account": [
        ("How do I change the email address on my {plan} account?",
         "Go to Settings > Profile > Email, enter the new address and confirm it.",
         {"plan": PLANS}),
        ("How do I delete my {plan} account and all my data?",
         "Go to Settings > Privacy > Delete account; deletion finishes within 30 days.",
         {"plan": PLANS}),
        ("Can I add another person to my {plan} account for free?",
         "Go to Settings > Members and click Invite; extra members follow your plan's price.",
         {"plan": PLANS}),
        ("How do I export my order history from the {device} app?",
         "Open Settings > Privacy > Export data; we email you a download link.",
         {"device": DEVICES}),
        ("How do I turn off marketing emails for my {plan} account?",
         "Click Unsubscribe in any email, or untick it under Settings > Notifications.",
         {"plan": PLANS}),
        ("How do I change my display name in the {device} app?",
         "Open Settings > Profile, edit Display name and tap Save.",
         {"device": DEVICES}),
        ("Can I move my {plan} account to {country} when I relocate?",
         "Yes, change your country under Settings > Profile; prices update at the next renewal.",
         {"plan": PLANS, "country": COUNTRIES}),
    ],
}

# Long messages and a copy of each with one word changed at the end: the copy shares all
# but one word shingle, a similarity over 0.9, so `dedupe` with that threshold drops it.
LONG = [
    ("shipping",
     "Hello, I ordered a desk lamp and a keyboard two weeks ago and the tracking page has said "
     "label created ever since, nobody answers the phone and I need the lamp for my new office "
     "before the end of the month, could you tell me what is going on please",
     "Sorry for the wait; the carrier lost the first label, so we shipped a new parcel today.",
     "thanks"),
    ("billing",
     "Hi, my company moved from the Plus plan to the Team plan in the middle of the month and "
     "the invoice shows the full Team price plus the full Plus price, which looks wrong to me "
     "because we only used Plus for two weeks, can you check the invoice please",
     "You are right; we prorated the change now and refunded the unused Plus days.",
     "today"),
    ("login",
     "Good morning, since the latest app update I cannot sign in on my tablet anymore, the "
     "app shows a spinning wheel after I type my password and then goes back to the start "
     "screen, it still works fine on my laptop, what should I try next please",
     "Clear the app cache or reinstall the app; the update fixed the sign-in loop.",
     "now"),
    ("refunds",
     "Hi team, I returned the coffee grinder three weeks ago with the free label and the "
     "tracking shows you received it on the fourth, but the refund has still not shown up on "
     "my credit card statement and I would like to know when to expect it please",
     "Your return was checked yesterday and the refund was sent; allow 5 business days.",
     "asap"),
    ("account",
     "Hello, I set up our Family account with my old work email which I no longer have access "
     "to, so I cannot confirm the change of email address that your settings page asks for, is "
     "there another way to move the account to my personal address please",
     "Yes, reply from your personal address with your order number and we move it for you.",
     "urgently"),
]

SHORT = [
    ("login", "login?", "Tap Forgot password on the sign-in screen and follow the link we email you."),
    ("refunds", "refund", "Open Orders, choose Return item and print the free label."),
    ("account", "help", "Tell us what you need help with and we will answer within a day."),
    ("billing", "invoice", "Open Settings > Billing > Invoices and click Download PDF."),
    ("shipping", "where?", "Open Orders, select the order and click Track package."),
]


def expand(category: str) -> list[dict[str, str]]:
    """Every filled-in (question, answer) of a category's templates."""
    rows = []
    for question, answer, slots in TEMPLATES[category]:
        names = list(slots)
        for values in itertools.product(*(slots[n] for n in names)):
            fill = dict(zip(names, values))
            rows.append({"question": question.format(**fill), "answer": answer.format(**fill),
                         "category": category})
    return rows


def make_rows(rng: random.Random) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for category in TEMPLATES:
        pool = expand(category)
        rows.extend(rng.sample(pool, min(PER_CATEGORY, len(pool))))
    rows.extend({"question": q, "answer": a, "category": c} for c, q, a, _ in LONG)
    rng.shuffle(rows)
    copies = [dict(r) for r in rng.sample(rows, 6)]  # exact duplicates
    for c, q, a, last_word in LONG:  # near duplicates: the last word replaced
        copies.append({"question": q.rsplit(" ", 1)[0] + " " + last_word, "answer": a, "category": c})
    for copy in copies:  # each copy lands somewhere after its original, so dedupe keeps the original
        original = next(i for i, r in enumerate(rows) if r["question"].split()[:20] == copy["question"].split()[:20])
        rows.insert(rng.randint(original + 1, len(rows)), copy)
    for c, q, a in SHORT:
        rows.insert(rng.randint(0, len(rows)), {"question": q, "answer": a, "category": c})
    return rows


def main() -> None:
    rows = make_rows(random.Random(SEED))
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
